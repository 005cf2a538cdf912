"""Starting vLLM for moesteer: environment defaults, what some families need to load, vLLM's
errors as one line, and the checkpoint facts read before anything loads."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from moesteer.dtypes import dtype_name

# In-process engine core unless the caller asks otherwise; Model Runner V1 (V2, vLLM's GPU default, has
# no hook points); a 1 GiB CPU KV cache unless the caller sizes it; vLLM's logs at ERROR unless the
# caller asks for more (VLLM_LOGGING_LEVEL=INFO): its INFO/WARNING lines are start-up chatter here.
ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}
# transformers 5 saves some families under architecture names vLLM does not register (it would fall
# back to its generic Transformers backend, which cannot run them): vLLM's own names
VLLM_ARCHITECTURES = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}
# KV block size on CPU. Only whole blocks enter vLLM's prefix cache, and its CPU default (128 tokens)
# leaves every prefix shorter than that uncached: a search step's continuation requests would
# recompute their whole prefix; with 32 (the CPU attention kernel's unit) at most the last 31 tokens.
CPU_BLOCK_SIZE = 32


@contextmanager
def one_line_errors() -> Iterator[None]:
    """vLLM's validation errors (a pydantic dump, a request it refuses) as one-line ``ValueError``s."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMClientError

    try:
        yield
    except ValidationError as err:
        reasons = [e["msg"].removeprefix("Value error, ").split(". ")[0] for e in err.errors()]
        raise ValueError(f"vLLM refused the configuration: {'; '.join(reasons)}") from None
    except VLLMClientError as err:
        raise ValueError(f"vLLM refused the request: {err}") from None


def checkpoint_dir(name: str) -> Path:
    """The local folder of a model: ``name`` itself, or its snapshot in the hub cache."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))


def generation_config(name: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(name)
    except OSError:
        return None


class TooLarge(ValueError):
    """A model copy that does not fit the memory of the device it should go on."""


def check_fits(checkpoint: Path, dtype: torch.dtype, device: torch.device) -> None:
    """A one-line :class:`TooLarge` when the weights of ``checkpoint`` in ``dtype`` exceed the free
    memory of ``device`` (read from the safetensors headers; nothing is loaded)."""
    from safetensors import safe_open

    numel = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            numel += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    need = numel * dtype.itemsize
    free = free_memory(device)
    if need > free:
        raise TooLarge(
            f"the HF copy that optimises routing needs {need / 2**30:.1f} GiB on {device} in {dtype_name(dtype)}, "
            f"{free / 2**30:.1f} GiB is free; pass gradient_device= / gradient_dtype=, or lower gpu_memory_utilization"
        )


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def on_gpu() -> bool:
    """Whether vLLM runs on a GPU here (its platform, not merely a visible device)."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def family_defaults(config, dtype: str, llm_kwargs: dict) -> dict:
    """``llm_kwargs`` plus what some families need to run as their checkpoints say (the user's
    settings win): vLLM's architecture name where transformers 5 saved another, and on CPU the
    reference MLA attention (DeepSeek) unless the model runs in bf16, the only dtype of vLLM's AMX
    MLA kernel, and KV blocks of :data:`CPU_BLOCK_SIZE` tokens."""
    kwargs = dict(llm_kwargs)
    saved = list(config.architectures or ())
    architectures = [VLLM_ARCHITECTURES.get(name, name) for name in saved]
    if architectures != saved and "hf_overrides" not in kwargs:
        kwargs["hf_overrides"] = {"architectures": architectures}
    from vllm.platforms import current_platform

    mla = getattr(config, "kv_lora_rank", None) is not None
    cpu_mla = mla and current_platform.is_cpu() and dtype not in ("bfloat16", "auto")
    if cpu_mla and "attention_config" not in kwargs and "attention_backend" not in kwargs:
        kwargs["attention_config"] = {"backend": "CPU_MLA"}
    if current_platform.is_cpu() and not mla:  # vLLM sets MLA's and DeepSeek-V4's block sizes itself
        kwargs.setdefault("block_size", CPU_BLOCK_SIZE)
    return kwargs
