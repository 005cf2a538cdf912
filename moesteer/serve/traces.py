"""Routing traces in vLLM's ``routed_experts`` form (what vLLM's routed-experts replay returns)."""

from __future__ import annotations

import numpy as np

from moesteer.trace import RoutingTrace


def routed_experts(trace: RoutingTrace, prompt_len: int, num_tokens: int) -> np.ndarray:
    """Branch 0's experts ``[prompt_len + num_tokens - 1, MoE layers, K]`` (int32, ``-1``: an
    inactive slot), positions in order: every token the model read (the last generated token is
    never read). Layers with different widths are padded to the widest."""
    joined = trace.joined(branch=0)
    length = prompt_len + num_tokens - 1
    layers = [joined[layer].experts[0, :length] for layer in sorted(joined)]
    width = max(int(e.shape[-1]) for e in layers)
    out = np.full((length, len(layers), width), -1, dtype=np.int32)
    for i, experts in enumerate(layers):
        out[: experts.shape[0], i, : experts.shape[-1]] = experts.numpy()
    return out
