"""Row surgery on a transformers ``DynamicCache``: left-pad, append rows (selecting rows is the
cache's own ``batch_select_indices``).

Rows of a decode session may have different lengths; a shorter row is left-padded with zero keys
and values whose attention-mask entries are 0, which softmax weighs exactly 0. Partial operations
(:func:`left_pad`, :func:`append`) need full-attention layers; sliding-window layers
keep a window whose padding cannot be moved, so they are refused with one line.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def check_full_attention(config, what: str) -> None:
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"{what} needs full attention in every layer; this model has {sorted(kinds)} layers")


def left_pad(cache: DynamicCache, n: int) -> None:
    """Prepend ``n`` zero positions to every row, in place."""
    if n <= 0:
        return
    for layer in cache.layers:
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            pad = layer.keys.new_zeros(*layer.keys.shape[:-2], n, layer.keys.shape[-1])
            layer.keys = torch.cat([pad, layer.keys], dim=-2)
            pad = layer.values.new_zeros(*layer.values.shape[:-2], n, layer.values.shape[-1])
            layer.values = torch.cat([pad, layer.values], dim=-2)


def append(cache: DynamicCache, other: DynamicCache) -> None:
    """Append ``other``'s rows after ``cache``'s, in place; both must have the same length."""
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        if not (extra.is_initialized and extra.keys is not None and extra.keys.numel()):
            continue
        if not (layer.is_initialized and layer.keys is not None and layer.keys.numel()):
            layer.lazy_initialization(extra.keys, extra.values)
            layer.keys, layer.values = extra.keys, extra.values
            continue
        layer.keys = torch.cat([layer.keys, extra.keys], dim=0)
        layer.values = torch.cat([layer.values, extra.values], dim=0)
