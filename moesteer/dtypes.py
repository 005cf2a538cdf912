"""Which dtype a model loads in: names, and the ``auto`` rule both backends share.

``auto`` (the default) is the checkpoint's own dtype on a GPU — bf16 for every target model, where
fp32 would not fit 30B-class models on one device and no CUDA MLA attention (DeepSeek) accepts it —
and float32 on the CPU, the reference every parity and golden test is measured in.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A dtype name as a torch dtype (``"auto"`` and ``None`` kept); a one-line ``ValueError`` otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config names (``dtype``, or ``torch_dtype`` before transformers 5);
    float32 when it names none."""
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, config, *, gpu: bool) -> torch.dtype:
    """The dtype to load ``config``'s model in: a named dtype as it is; ``auto`` or ``None`` by the
    module's rule (``gpu``: the model runs on a GPU)."""
    parsed = parse_dtype(dtype)
    if isinstance(parsed, torch.dtype):
        return parsed
    return checkpoint_dtype(config) if gpu else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (vLLM's names)."""
    return str(dtype).removeprefix("torch.")
