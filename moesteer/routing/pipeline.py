"""The routing pipeline: expert selection under policies, the computation every backend shares.

A backend hands over one router call's logits ``[T, E]``, the tokens' noise keys and, per policy,
the tokens it routes; :func:`route_tokens` returns expert ids, mixing weights and an ``active``
mask ``[T, K]``. :func:`select` runs one policy's edit through the fixed stages of
:mod:`moesteer.routing.policy`, knowing no rule by name. Groups with different k are padded to the
largest k with real, distinct expert ids at weight exactly 0, which every experts kernel accepts.
The family's scoring rule (:mod:`moesteer.models.scoring`) turns a selection into weights, so an
edit-free selection reproduces the family's router.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from moesteer.models.scoring import RouterFacts, Scoring
from moesteer.routing.call import DefaultRouting, RouterCall, RouterSite, Selection, TokenKeys, expert_mask
from moesteer.routing.policy import Policy, RouterEdit, Stage

Groups = list[tuple[RouterEdit | None, Tensor | None]]  # (edit, its tokens; None = all tokens)


def route_tokens(
    scoring: Scoring,
    facts: RouterFacts,
    site: RouterSite,
    logits: Tensor,
    groups: Groups,
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
            call = RouterCall(scoring, facts, site, keys.take(tokens), hidden_dtype, n_slots, sub)
            part = select(call, edit or RouterEdit())
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


def select(call: RouterCall, edit: RouterEdit) -> Selection:
    """Expert ids, weights and active mask ``[T, K]`` of one policy's tokens: the edit's stages
    at the fixed points of :mod:`moesteer.routing.policy`, around the family's key, top-k and
    weights."""
    stages, site = edit.stages, call.site
    for stage in stages:
        routed = stage.route(call)
        if routed is not None:
            return routed
    call.slots = slots = edit.slots(site.top_k)
    needed = max(slots) + 1
    if needed > site.num_experts:
        raise ValueError(f"the policy selects rank {needed}, but layer {site.layer} has {site.num_experts} experts")
    for stage in stages:
        stage.on_logits(call)
    if edit.masked:
        call.logits = call.logits.masked_fill(expert_mask(edit.masked, call.logits), float("-inf"))
    call.key_logits = call.logits
    for stage in stages:
        stage.on_noise(call)
    with torch.no_grad():
        for stage in stages:
            stage.on_key(call)
        if call.key is None:
            call.key = call._from_key = call.scoring.key(call.facts, call.key_logits, needed)
        key = call.key
        if edit.masked:  # sigmoid families score -inf logits as 0, still selectable
            key = key.masked_fill(expert_mask(edit.masked, key), float("-inf"))
        if edit.forced:
            key = key.masked_fill(expert_mask(edit.forced, key), float("inf"))
        call.key = key
        n_top = max(needed, call.n_slots)
        in_order = slots == list(range(n_top))
        top = key.topk(n_top, dim=-1, sorted=call.scoring.sorted_topk or not in_order or edit.sorted).indices
        if not in_order:
            rest = [p for p in range(n_top) if p not in set(slots)]
            top = top[:, (slots + rest)[: call.n_slots]]
    call.top = top
    call.active = (torch.arange(call.n_slots, device=top.device) < len(slots)).expand(top.shape[0], call.n_slots)
    for stage in stages:
        stage.on_active(call)
    for stage in stages:
        stage.on_weights(call)
    return call.top, call.weights, call.active


def _merge_unedited(groups: Groups, num_tokens: int) -> Groups:
    """The edit-free groups as one (e.g. the tokens that many position-scoped policies leave to the
    model's routing): one routing call for them, however many policies there are. Routing is
    row-wise, so the merge changes no token's selection."""
    plain = [tokens for edit, tokens in groups if edit is None]
    if len(plain) < 2:
        return groups
    merged = torch.cat(plain).sort().values
    edited = [(edit, tokens) for edit, tokens in groups if edit is not None]
    return [*edited, (None, None if not edited and len(merged) == num_tokens else merged)]


def _merge_by_values(groups: Groups, logits: Tensor) -> Groups:
    """Groups whose edits differ only in the values of their stages' per-expert tensors (a stage's
    ``values`` field: a bias, mixing weights ω, e.g. fitted per sequence) as one group whose
    tensors are per token ``[T, E]``: one selection for all of them instead of one per group.
    Selection is row-wise for such edits, so no token's routing changes; coupled stages
    (capacity), stages holding other tensors (replays) and per-row tensors keep their own groups."""
    forms: dict[tuple, list[tuple[RouterEdit, Tensor]]] = {}
    kept: Groups = []
    for edit, tokens in groups:
        form = _value_form(edit) if edit is not None and tokens is not None else None
        if form is None:
            kept.append((edit, tokens))
        else:
            forms.setdefault(form, []).append((edit, tokens))  # type: ignore[arg-type]
    for members in forms.values():
        if len(members) == 1:
            kept.append(members[0])
            continue
        tokens = torch.cat([t for _, t in members])
        stages = [
            dataclasses.replace(stage, values=torch.cat([_spread(e.stages[i], t, logits) for e, t in members]))
            if _values(stage) is not None
            else stage
            for i, stage in enumerate(members[0][0].stages)
        ]
        kept.append((dataclasses.replace(members[0][0], stages=stages), tokens))
    return kept


def _values(stage: Stage) -> Tensor | None:
    values = getattr(stage, "values", None) if dataclasses.is_dataclass(stage) else None
    return values if isinstance(values, Tensor) else None


def _spread(stage: Stage, tokens: Tensor, logits: Tensor) -> Tensor:
    values = _values(stage)
    assert values is not None
    return values.to(logits.device).expand(len(tokens), -1)


def _value_form(edit: RouterEdit) -> tuple | None:
    """What an edit does apart from its stages' per-expert values (``None``: not mergeable)."""
    values = [v for v in map(_values, edit.stages) if v is not None]
    if not values or any(v.dim() != 1 for v in values):
        return None
    form: list = [edit.k, edit.ranks, tuple(sorted(edit.forced)), tuple(sorted(edit.masked)), edit.sorted]
    for stage in edit.stages:
        if stage.coupled or not dataclasses.is_dataclass(stage):
            return None
        form.append(type(stage))
        for f in dataclasses.fields(stage):
            value = getattr(stage, f.name)
            if f.name == "values" and isinstance(value, Tensor):
                value = value.shape[0]
            elif isinstance(value, Tensor):
                return None
            elif isinstance(value, set):
                value = tuple(sorted(value))
            elif isinstance(value, Mapping):
                value = tuple(sorted(value.items()))
            form.append(value)
    try:
        hash(tuple(form))
    except TypeError:
        return None
    return tuple(form)


class EditCache:
    """The edit of each (policy, layer), computed once per policy object and call; both backends'
    router hooks keep one. Edits hold tensors by reference, so in-place updates stay visible."""

    def __init__(self, sites: Mapping[int, RouterSite]) -> None:
        self.sites = sites
        self._edits: dict[tuple[int, int], tuple[Policy, RouterEdit | None]] = {}

    def get(self, policy: Policy | None, layer: int) -> RouterEdit | None:
        if policy is None:
            return None
        key = (id(policy), layer)
        cached = self._edits.get(key)
        if cached is None or cached[0] is not policy:
            cached = (policy, policy.edit(self.sites[layer]))
            self._edits[key] = cached
        return cached[1]
