"""Keyed randomness: every random draw of moesteer is a pure function of integer keys.

Counter-based hashing (lowbias32 steps in int64 arithmetic) turns keys such as
(seed, prompt, sample, branch, layer, position) into uniform bits, so the same keys give the same
noise on any batch layout, device and backend: batched and one-by-one decoding agree, and a forked
sequence's children draw their own noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) in int64 arithmetic, so no product overflows."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hash_step(h: Tensor, value: Tensor | int) -> Tensor:
    """One key folded into the hash state ``h``: ``mix32(h·16777619 + value)``."""
    return mix32((h * 0x01000193 + value) & _M32)


def gumbel_noise(seed: int | Tensor, keys: Sequence[Tensor | int], width: int) -> Tensor:
    """Standard Gumbel noise ``[T, width]`` as a pure function of its keys (counter-based).

    ``keys`` are int tensors ``[T]`` or ints, e.g. (prompt, sample, branch, layer, position); the
    ``seed`` is an int or, when the tokens come from calls with different seeds, one per token.
    """
    return gumbel_from(key_hash(seed, keys), (), width)


def key_hash(seed: int | Tensor, keys: Sequence[Tensor | int]) -> Tensor:
    """The hash state ``[T]`` of ``seed`` and ``keys`` (at least one a tensor), which
    :func:`gumbel_from` continues: ``gumbel_noise(seed, a + b, w) == gumbel_from(key_hash(seed, a), b, w)``,
    so keys shared by many draws (e.g. every layer of a forward) are hashed once."""
    rows = next(k for k in keys if isinstance(k, Tensor))
    seeds = seed.long() & _M32 if isinstance(seed, Tensor) else torch.full_like(rows, seed & _M32, dtype=torch.int64)
    return _chain(mix32(seeds), keys)


def gumbel_from(h: Tensor, keys: Sequence[Tensor | int], width: int) -> Tensor:
    """:func:`gumbel_noise` from a :func:`key_hash` state and the remaining ``keys``."""
    h = _chain(h, keys)
    experts = torch.arange(width, device=h.device, dtype=torch.int64)
    bits = hash_step(h[:, None], experts[None, :])
    uniform = (bits.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(uniform)).float()


def _chain(h: Tensor, keys: Sequence[Tensor | int]) -> Tensor:
    for key in keys:
        h = hash_step(h, key.long() & _M32 if isinstance(key, Tensor) else key & _M32)
    return h


def child_key(sample_key: int, child: int) -> int:
    """The sample key of a forked child: a hash of its parent's key and its index (32-bit)."""
    return int(hash_step(torch.tensor([sample_key & _M32]), child + 1)[0])


def fork_keys(sample_key: int, copies: int, sample_keys: Sequence[int] | None = None) -> list[int]:
    """The sample keys of ``copies`` forked children: ``sample_keys`` as given (checked), else
    hashes of their parent's ``sample_key``."""
    keys = [child_key(sample_key, c) for c in range(copies)] if sample_keys is None else list(sample_keys)
    if len(keys) != copies:
        raise ValueError(f"fork: {len(keys)} sample keys for {copies} copies")
    return keys
