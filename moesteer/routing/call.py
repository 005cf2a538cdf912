"""One router call as the pipeline sees it: the tokens' noise keys, the call's evolving tensors,
and the tensor helpers the routing rules share.

Shapes: ``T`` tokens of the call, ``E`` experts, ``K`` selection slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moesteer.keys import gumbel_from, key_hash
from moesteer.models.scoring import RouterFacts, Scoring

Selection = tuple[Tensor, Tensor, Tensor]  # ids [T, K], weights [T, K], active [T, K]
DefaultRouting = Callable[[Tensor | None, int], Selection]  # (tokens or None for all, slots) -> selection


@dataclass(frozen=True)
class RouterSite:
    """Where a router call happens: decoder layer, its index among the model's MoE layers, sizes."""

    layer: int
    moe_index: int
    num_moe_layers: int
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class TokenKeys:
    """Noise keys of each routed token: ``(seed, prompt, sample, branch, layer, position)``."""

    prompt: Tensor
    sample: Tensor
    branch: Tensor
    position: Tensor
    seed: int | Tensor = 0  # one for the call, or one per token (requests of several calls in one step)
    decode: bool = False  # the forward feeds one token per sequence (a decode step)
    bound: int | None = None  # every position is below it, known on the host (None: unknown)

    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def take(self, tokens: Tensor | None) -> TokenKeys:
        """The keys of ``tokens``; the same tensor (e.g. a group's tokens at every layer of a
        forward) gets the same object back, so its indexing and noise hash run once."""
        if tokens is None:
            return self
        held = self._memo.get(id(tokens))
        if held is not None and held[0] is tokens:
            return held[1]
        taken = TokenKeys(
            self.prompt[tokens],
            self.sample[tokens],
            self.branch[tokens],
            self.position[tokens],
            self.seed[tokens] if isinstance(self.seed, Tensor) else self.seed,
            self.decode,
            self.bound,
        )
        self._memo[id(tokens)] = (tokens, taken)  # holding ``tokens`` keeps its id from being reused
        return taken

    def noise(self, layer: int, width: int) -> Tensor:
        """Gumbel noise ``[T, width]`` keyed by (seed, prompt, sample, branch, layer, position); the
        hash of the layer-free keys is computed once per object."""
        if "hash" not in self._memo:
            self._memo["hash"] = key_hash(self.seed, (self.prompt, self.sample, self.branch))
        return gumbel_from(self._memo["hash"], (layer, self.position), width)


@dataclass
class RouterCall:
    """One policy's tokens in one router call, passed through the stages of the pipeline.

    The inputs are fixed; each stage reads what earlier stages left and sets its own fields:
    ``logits [T, E]`` (the router logits, edited: they set the selection key and the weights),
    ``key_logits`` (what the family's key scores: ``logits`` plus selection noise), ``key [T, E]``
    (the order experts are selected in), ``top [T, K]`` (the selected expert ids), ``active [T, K]``
    (slots that carry weight) and ``weights [T, K]`` (the mixing weights; read lazily, so a stage
    that sets them spares the family's rule).
    """

    scoring: Scoring
    facts: RouterFacts
    site: RouterSite
    keys: TokenKeys
    hidden_dtype: torch.dtype
    n_slots: int  # the call's slot count: the widest group's
    logits: Tensor
    slots: list[int] = field(default_factory=list)  # the positions in key order this policy selects
    key_logits: Tensor | None = None
    key: Tensor | None = None
    top: Tensor | None = None
    active: Tensor | None = None
    _weights: Tensor | None = field(default=None, repr=False)
    _from_key: Tensor | None = field(default=None, repr=False)  # the family's key, when it scored key_logits

    @property
    def weights(self) -> Tensor:
        """The mixing weights ``[T, K]``: the family's rule on the selected experts unless a stage set them."""
        if self._weights is None:
            assert self.top is not None and self.active is not None
            if self._from_key is not None and self.key_logits is self.logits and not self.logits.requires_grad:
                self._weights = self.scoring.weights_from_key(
                    self.facts, self.logits, self._from_key, self.top, self.active, self.hidden_dtype
                )
            else:
                self._weights = self.scoring.weights(self.facts, self.logits, self.top, self.active, self.hidden_dtype)
        return self._weights

    @weights.setter
    def weights(self, value: Tensor) -> None:
        self._weights = value

    def distribution(self) -> Tensor:
        """The family's router distribution ``[T, E]`` over the (edited) logits."""
        return self.scoring.distribution(self.facts, self.logits)

    def noise(self, width: int | None = None) -> Tensor:
        """The tokens' Gumbel noise at this layer, ``[T, width]`` (default: one per expert)."""
        width = self.site.num_experts if width is None else width
        return self.keys.noise(self.site.layer, width).to(self.logits.device)


def per_token(values: Tensor, logits: Tensor) -> Tensor:
    """A per-expert tensor ``[E]`` or per-row ``[rows, E]`` spread over the tokens of ``logits [T, E]``
    (each row's tokens contiguous, as the engines lay them out)."""
    values = values.to(logits.device)
    if values.dim() == 1:
        return values
    rows, tokens = values.shape[0], logits.shape[0]
    if tokens % rows:
        raise ValueError(f"a per-row routing tensor has {rows} rows, but the router call has {tokens} tokens")
    return values.repeat_interleave(tokens // rows, dim=0)


def expert_mask(experts: set[int] | tuple[int, ...], like: Tensor) -> Tensor:
    """``[E]``: True at ``experts``, on ``like``'s device."""
    chosen = torch.tensor(sorted(experts), dtype=torch.long, device=like.device)
    return torch.zeros(like.shape[-1], dtype=torch.bool, device=like.device).index_fill(0, chosen, True)


def pad_selection(logits: Tensor, index: Tensor, weights: Tensor, n_slots: int) -> Selection:
    """Widen a selection to ``n_slots`` with the next-best unselected experts at weight 0."""
    k = index.shape[1]
    active = torch.ones(index.shape[0], n_slots, dtype=torch.bool, device=index.device)
    if n_slots == k:
        return index, weights, active
    rest = logits.scatter(1, index.long(), float("-inf")).topk(n_slots - k, dim=-1).indices
    active[:, k:] = False
    padded = torch.cat([weights, weights.new_zeros(weights.shape[0], n_slots - k)], dim=1)
    return torch.cat([index.long(), rest], dim=1), padded, active
