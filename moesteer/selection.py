"""Expert selection under routing policies: the computation every backend shares.

A backend hands over one router call's logits ``[T, E]``, the tokens' noise keys and, per policy,
the tokens it routes; :func:`route_tokens` returns expert ids, mixing weights and an ``active``
mask ``[T, slots]``. Groups with different k are padded to the largest k with real, distinct
expert ids at weight exactly 0, which every experts kernel accepts. The family's scoring rule
(:mod:`moesteer.models.scoring`) turns a selection into weights, so an edit-free selection
reproduces the family's router.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moesteer.keys import gumbel_from, key_hash
from moesteer.models.scoring import RouterFacts, Scoring
from moesteer.routing import CapacityEdit, RouterEdit, RouterSite

Selection = tuple[Tensor, Tensor, Tensor]  # ids [T, S], weights [T, S], active [T, S]
DefaultRouting = Callable[[Tensor | None, int], Selection]  # (tokens or None for all, slots) -> selection


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


def route_tokens(
    scoring: Scoring,
    facts: RouterFacts,
    site: RouterSite,
    logits: Tensor,
    groups: list[tuple[RouterEdit | None, Tensor | None]],
    keys: TokenKeys,
    hidden_dtype: torch.dtype,
    default: DefaultRouting | None = None,
) -> Selection:
    """Select experts for every token; ``groups`` pairs an edit with its tokens (``None`` = all).

    Tokens of an edit-free group take ``default`` when given (a backend's own router), else the
    family's rule through ``scoring``.
    """
    groups = _merge_by_values(_merge_unedited(groups, logits.shape[0]), logits)
    n_slots = max(len(edit.slots(site.top_k)) if edit else site.top_k for edit, _ in groups)
    index = weights = active = None
    for edit, tokens in groups:
        if edit is None and default is not None:
            part = default(tokens, n_slots)
        else:
            sub = logits if tokens is None else logits[tokens]
            part = select(scoring, facts, site, sub, edit or RouterEdit(), n_slots, keys.take(tokens), hidden_dtype)
        if tokens is None:
            return part
        if index is None:
            index = torch.empty(logits.shape[0], n_slots, dtype=torch.long, device=logits.device)
            weights = torch.zeros(logits.shape[0], n_slots, dtype=part[1].dtype, device=logits.device)
            active = torch.zeros(logits.shape[0], n_slots, dtype=torch.bool, device=logits.device)
        index.index_copy_(0, tokens, part[0].to(index.dtype))  # in place: autograd follows the weights
        weights.index_copy_(0, tokens, part[1].to(weights.dtype))
        active.index_copy_(0, tokens, part[2])
    assert index is not None and weights is not None and active is not None
    return index, weights, active


def _merge_unedited(
    groups: list[tuple[RouterEdit | None, Tensor | None]], num_tokens: int
) -> list[tuple[RouterEdit | None, Tensor | None]]:
    """The edit-free groups as one (e.g. the tokens that many position-scoped policies leave to the
    model's routing): one routing call for them, however many policies there are. Routing is
    row-wise, so the merge changes no token's selection."""
    plain = [tokens for edit, tokens in groups if edit is None]
    if len(plain) < 2:
        return groups
    merged = torch.cat(plain).sort().values
    edited = [(edit, tokens) for edit, tokens in groups if edit is not None]
    return [*edited, (None, None if not edited and len(merged) == num_tokens else merged)]


_VALUES = ("biases", "weights")  # the edit fields whose tensors may differ within one merged group


def _merge_by_values(
    groups: list[tuple[RouterEdit | None, Tensor | None]], logits: Tensor
) -> list[tuple[RouterEdit | None, Tensor | None]]:
    """Groups whose edits differ only in the values of their per-expert tensors (biases, mixing
    weights ω: e.g. a bias fitted per sequence) as one group whose tensors are per token ``[T, E]``:
    one selection for all of them instead of one per group. Selection is row-wise for such edits,
    so no token's routing changes; capacity (coupled across a group's tokens), replays and per-row
    tensors keep their own groups."""
    forms: dict[tuple, list[tuple[RouterEdit, Tensor]]] = {}
    kept: list[tuple[RouterEdit | None, Tensor | None]] = []
    for edit, tokens in groups:
        form = _value_form(edit) if edit is not None and tokens is not None else None
        if form is None:
            kept.append((edit, tokens))
        else:
            forms.setdefault(form, []).append((edit, tokens))
    for members in forms.values():
        if len(members) == 1:
            kept.append(members[0])
            continue
        tokens = torch.cat([t for _, t in members])
        spread = lambda value, t: value.to(logits.device).expand(len(t), -1)  # noqa: E731
        biases = [torch.cat([spread(e.biases[i], t) for e, t in members]) for i in range(len(members[0][0].biases))]
        weights = None
        if members[0][0].weights is not None:
            weights = torch.cat([spread(e.weights, t) for e, t in members])
        kept.append((dataclasses.replace(members[0][0], biases=biases, weights=weights), tokens))
    return kept


def _value_form(edit: RouterEdit) -> tuple | None:
    """What an edit does apart from its per-expert tensors' values (``None``: not mergeable)."""
    if edit.capacity is not None or edit.replay is not None or edit.scale_tensors:
        return None
    values = [*edit.biases, *([] if edit.weights is None else [edit.weights])]
    if not values or any(v.dim() != 1 for v in values):
        return None
    form = [len(edit.biases), edit.weights is not None, *(v.shape[0] for v in values)]
    for f in dataclasses.fields(edit):
        if f.name in _VALUES:
            continue
        value = getattr(edit, f.name)
        if isinstance(value, set):
            value = tuple(sorted(value))
        elif isinstance(value, dict):
            value = tuple(sorted(value.items()))
        elif isinstance(value, list):  # scale_tensors: empty here
            value = tuple(value)
        form.append(value)
    return tuple(form)


def select(
    scoring: Scoring,
    facts: RouterFacts,
    site: RouterSite,
    logits: Tensor,
    edit: RouterEdit,
    n_slots: int,
    keys: TokenKeys,
    hidden_dtype: torch.dtype,
) -> Selection:
    """Expert ids, weights and active mask ``[T, n_slots]`` of one policy's tokens."""
    if edit.replay is not None:
        return replayed(edit.replay, keys, n_slots, site, logits)
    slots = edit.slots(site.top_k)
    needed = max(slots) + 1
    if needed > site.num_experts:
        raise ValueError(f"the policy selects rank {needed}, but layer {site.layer} has {site.num_experts} experts")
    for bias in edit.biases:
        logits = logits + per_token(bias, logits).to(dtype=logits.dtype)
    if edit.steer_on or edit.steer_off:
        logits = steer_logits(logits, edit)
    if edit.masked:
        logits = logits.masked_fill(expert_mask(edit.masked, logits), float("-inf"))
    noisy = logits
    if edit.tau > 0 and not edit.random:
        noisy = logits + edit.tau * keys.noise(site.layer, site.num_experts).to(logits.device)
        if edit.noisy_weights:
            logits = noisy
    capacity = edit.capacity
    expanded = capacity is not None and capacity.expanded
    with torch.no_grad():
        # top-k of pure Gumbel noise = uniform sampling without replacement
        if edit.weights is not None:
            key = per_token(edit.weights, logits).detach().expand_as(logits)
        elif edit.random:
            key = keys.noise(site.layer, site.num_experts).to(logits.device)
        else:
            key = scoring.key(facts, noisy, needed)
        unfilled = key  # the key before masks and forced experts fill it
        if edit.masked:  # sigmoid families score -inf logits as 0, still selectable
            key = key.masked_fill(expert_mask(edit.masked, key), float("-inf"))
        if edit.forced:
            key = key.masked_fill(expert_mask(edit.forced, key), float("inf"))
        n_top = max(needed, n_slots)
        in_order = slots == list(range(n_top))
        top = key.topk(n_top, dim=-1, sorted=scoring.sorted_topk or not in_order or expanded).indices
        if not in_order:
            rest = [p for p in range(n_top) if p not in set(slots)]
            top = top[:, (slots + rest)[:n_slots]]
    used = capacity.k if expanded else len(slots)  # expanded drop routes over every slot, k of them at decode
    active = (torch.arange(n_slots, device=top.device) < used).expand(top.shape[0], n_slots)
    if expanded and not keys.decode:
        selectable = key.gather(-1, top) > float("-inf")  # not masked, inside the kept groups
        active = expert_choice(top, selectable, scoring.distribution(facts, logits).detach(), capacity, keys, site)
    if edit.top_p is not None:
        active = top_p_active(scoring.distribution(facts, logits).detach().gather(-1, top), edit, len(slots))
    if edit.weights is not None:
        weights = override_weights(per_token(edit.weights, logits), top, active, edit.renormalise_weights)
    elif noisy is logits and not edit.random and not logits.requires_grad:  # the key scored these logits
        weights = scoring.weights_from_key(facts, logits, unfilled, top, active, hidden_dtype)
    else:
        weights = scoring.weights(facts, logits, top, active, hidden_dtype)
    if expanded:  # a token no expert took has no weights to renormalise: 0, not 0/0
        weights = torch.where(active, weights, torch.zeros_like(weights))
    if edit.renormalise_top_p is not None:
        chosen = scoring.distribution(facts, logits).gather(-1, top) * active
        weights = (chosen / chosen.sum(-1, keepdim=True) if edit.renormalise_top_p else chosen).to(weights.dtype)
    if capacity is not None and not keys.decode:
        if not expanded:
            active = capacity_drop(top, active, scoring.distribution(facts, logits).detach(), capacity, keys, site)
            weights = torch.where(active, weights, torch.zeros_like(weights))
        if capacity.renormalise:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
    scale = expert_scale(edit, site.num_experts, logits.device)
    if scale is not None:
        weights = weights * scale.gather(0, top.flatten()).view_as(top).to(weights.dtype)
    return top, weights, active


def replayed(recording: tuple[Tensor, Tensor], keys: TokenKeys, n_slots: int, site, logits: Tensor) -> Selection:
    """A recorded routing at the tokens' positions: its experts and weights, padded to ``n_slots``
    at weight 0. Positions beyond the recording are refused; the check reads the device (a host
    sync) only when the keys' host-side ``bound`` does not already rule them out."""
    ids, weights = recording
    if keys.bound is None or keys.bound > len(ids):
        last = int(keys.position.max()) if len(keys.position) else -1
        if last >= len(ids):
            raise ValueError(f"Replay: layer {site.layer} is recorded for positions < {len(ids)}, not {last}")
    ids, weights = ids.to(logits.device)[keys.position], weights.to(logits.device)[keys.position]
    recorded = ids >= 0
    index, padded, active = pad_selection(logits, ids.clamp(min=0), torch.where(recorded, weights, 0.0), n_slots)
    active = torch.cat([recorded, active[:, ids.shape[1] :]], dim=1)
    return index, padded, active


def expert_capacity(capacity: CapacityEdit, tokens: int, num_experts: int) -> float:
    """C = ⌈γ·k·T/E⌉ (∞ for γ = ∞)."""
    return math.inf if math.isinf(capacity.gamma) else math.ceil(capacity.gamma * capacity.k * tokens / num_experts)


def capacity_priority(top: Tensor, probs: Tensor, order: str, keys: TokenKeys, site: RouterSite) -> Tensor:
    """``[T, S]``: which (token, slot) pairs an expert keeps first under the drop ``order``."""
    if order == "score":
        return probs.gather(-1, top)
    if order == "random":
        return keys.noise(site.layer, top.shape[1])
    index = torch.arange(top.shape[0], device=top.device, dtype=torch.float)[:, None].expand_as(top)
    return -index if order == "first" else index


def capacity_drop(
    top: Tensor, active: Tensor, probs: Tensor, capacity: CapacityEdit, keys: TokenKeys, site: RouterSite
) -> Tensor:
    """Token drop (arXiv 2503.05066): each expert keeps at most C of the (token, slot) pairs routed
    to it in this call, by the drop order (ties: the earlier pair first), and the others become
    inactive. Pairs are ranked within their expert by one sort, on the device."""
    limit = expert_capacity(capacity, top.shape[0], site.num_experts)
    if limit >= top.numel():
        return active
    priority = capacity_priority(top, probs, capacity.drop, keys, site).flatten()
    experts = top.flatten().masked_fill(~active.flatten(), site.num_experts)  # inactive pairs: one extra "expert"
    best_first = priority.argsort(descending=True, stable=True)
    order = best_first[experts[best_first].argsort(stable=True)]  # by expert, best first within each
    grouped = experts[order]
    rank = torch.arange(len(order), device=top.device) - torch.searchsorted(grouped, grouped)  # place in its expert
    kept = torch.empty_like(active.flatten()).scatter(0, order, rank < limit)
    return kept.view_as(active) & active


def expert_choice(
    top: Tensor, selectable: Tensor, probs: Tensor, capacity: CapacityEdit, keys: TokenKeys, site: RouterSite
) -> Tensor:
    """Expanded drop (arXiv 2503.05066, "overselect"): ``top [T, E]`` lists every expert once per
    token; each expert takes its C best tokens by the drop order among the tokens for which it is
    ``selectable``. Returns the active mask ``[T, E]``."""
    limit = expert_capacity(capacity, top.shape[0], site.num_experts)
    priority = capacity_priority(top, probs, capacity.drop, keys, site).float()
    priority = priority.masked_fill(~selectable, float("-inf"))
    by_expert = torch.full_like(priority, float("-inf")).scatter(1, top, priority)  # [T, E], expert columns
    taken = min(int(limit) if math.isfinite(limit) else top.shape[0], top.shape[0])
    best = by_expert.argsort(dim=0, descending=True, stable=True)[:taken]
    chosen = torch.zeros_like(by_expert, dtype=torch.bool).scatter(0, best, True) & (by_expert > float("-inf"))
    return chosen.gather(1, top)


def steer_logits(logits: Tensor, edit: RouterEdit) -> Tensor:
    """SteerMoE's edit of the logits z (:class:`moesteer.routing.SteerMoE`, amount a): ``'hard'``,
    on s = log_softmax(z), activated s_i = max s + a and deactivated s_i = min s − a (the family's
    rule then runs on s); ``'soft'``, z_i ± a·std(z); ``'add'``, z_i ± a."""
    if edit.steer_mode == "hard":
        s = torch.log_softmax(logits.float(), dim=-1)
        high = s.max(-1, keepdim=True).values + edit.steer_amount
        low = s.min(-1, keepdim=True).values - edit.steer_amount
    else:
        s = logits.float()
        step = edit.steer_amount * (s.std(-1, keepdim=True) if edit.steer_mode == "soft" else torch.ones_like(s[:, :1]))
        high, low = s + step, s - step
    if edit.steer_on:
        s = torch.where(expert_mask(edit.steer_on, s), high, s)
    if edit.steer_off:
        s = torch.where(expert_mask(edit.steer_off, s), low, s)
    return s.to(logits.dtype)


def top_p_active(probs: Tensor, edit: RouterEdit, k_max: int) -> Tensor:
    """``[T, n_slots]``: among each token's first ``k_max`` slots (router probabilities ``probs``),
    the most probable ones whose probabilities reach ``edit.top_p``, ``edit.k_min``..``k_max`` of
    them. The slots keep their order (the family's own), so a full set is the model's routing."""
    slots = torch.arange(probs.shape[-1], device=probs.device)
    ranked, order = probs.masked_fill(slots >= k_max, -1.0).sort(dim=-1, descending=True, stable=True)
    count = ((ranked.cumsum(-1) < edit.top_p).sum(-1) + 1).clamp(edit.k_min, k_max)  # p = 1: all k_max
    return torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, order, slots < count[:, None])


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


def override_weights(omega: Tensor, top: Tensor, active: Tensor, renormalise: bool) -> Tensor:
    """Mixing weights ω at the selected experts (0 at inactive slots), renormalised over the active ones."""
    w = omega.expand(top.shape[0], -1).gather(-1, top)
    w = torch.where(active, w, torch.zeros_like(w))
    return w / w.sum(dim=-1, keepdim=True) if renormalise else w


def expert_mask(experts: set[int], like: Tensor) -> Tensor:
    """``[E]``: True at ``experts``, on ``like``'s device."""
    chosen = torch.tensor(sorted(experts), dtype=torch.long, device=like.device)
    return torch.zeros(like.shape[-1], dtype=torch.bool, device=like.device).index_fill(0, chosen, True)


def expert_scale(edit: RouterEdit, num_experts: int, device: torch.device) -> Tensor | None:
    if not edit.scale and not edit.scale_tensors:
        return None
    scale = torch.ones(num_experts, device=device)
    for expert, factor in edit.scale.items():
        scale[expert] = factor
    for factors in edit.scale_tensors:
        scale = scale * factors.to(device)
    return scale
