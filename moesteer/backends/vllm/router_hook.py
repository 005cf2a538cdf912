"""Routing policies inside vLLM: per-token policy groups each step, applied in every MoE router.

Two instance patches on each of vLLM's workers (every tensor-parallel rank; nothing else in vLLM
changes), installed by :mod:`.worker` through ``collective_rpc``:

* ``model_runner._model_forward`` — before each forward, reads the scheduled requests
  (``input_batch.req_ids``, ``query_start_loc``, ``positions``) and builds the step's plan: which
  tokens each policy routes and the tokens' noise keys (prompt, sample, branch, position — the HF
  engine's keys, so Gumbel routing noise is identical across backends; prompt positions use
  sample 0, as the HF engine's shared prefill does); a position-scoped policy (``Scoped``) routes the
  positions it selects, the request's other tokens take the model's own routing;
* each fused-MoE router's ``_compute_routing`` — with no steered token in the step it is vLLM's
  own routing, untouched (bit-identical); otherwise steered tokens are selected by
  :func:`moesteer.selection.route_tokens` under the family's rule (:mod:`moesteer.models.scoring`)
  with the :class:`RouterFacts` of vLLM's router (:func:`router_facts`: its renormalisation,
  expert groups, routed scaling, correction bias), and unsteered tokens keep vLLM's routing,
  padded with weight-0 experts when another group selects more.

With ``generate(trace=True)`` each sequence's branch 0 records every router call of its tokens
(the chosen experts and weights, as the HF engine's trace; no full distributions).

Under tensor parallelism every rank routes all tokens itself, so every rank must route alike:
policies draw only keyed noise (no global RNG). On request (:meth:`RouterHook.audit`) a hook keeps a
digest of every steered routing it computes, which the engine compares across ranks.

Different k in one batch: every group is padded to the largest k (real expert ids at weight 0),
so one fused-experts call serves the whole batch.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass
from types import MethodType

import torch
from torch import Tensor, nn

from moesteer.backends.vllm.registry import Registry
from moesteer.models.adapters import FamilyAdapter
from moesteer.models.scoring import GroupLimited, RouterFacts, SparseMixer, TopKSoftmax
from moesteer.routing import EditCache, Policy, RouterSite, Scoped
from moesteer.selection import TokenKeys, pad_selection, route_tokens
from moesteer.trace import RouterRecord, RoutingTrace, RowId

_LAYER = re.compile(r"layers\.(\d+)\.")


def router_facts(router, adapter: FamilyAdapter) -> RouterFacts:
    """The :class:`RouterFacts` of one of vLLM's fused-MoE routers, read from its own attributes
    (every router class of vLLM 0.32 names them alike); a one-line ``ValueError`` when vLLM routes
    the family otherwise than moesteer's rule for it (e.g. a DeepSeek-V3 config without
    ``scoring_func="sigmoid"``, which vLLM then scores with softmax)."""
    family, scoring = adapter.model_type, adapter.scoring
    scoring_func = getattr(router, "scoring_func", "softmax")
    grouped = getattr(router, "use_grouped_topk", True)
    groups = int(getattr(router, "num_expert_group", None) or 1) if grouped else 1
    renormalise = bool(getattr(router, "renormalize", True))
    custom = getattr(router, "custom_routing_function", None)
    jitter = 0.0
    if isinstance(scoring, SparseMixer):
        from vllm.model_executor.models import phimoe

        if custom is not phimoe.phimoe_routing_function:
            raise ValueError(f"vLLM routes {family} without its sparsemixer; steering it in vLLM is not supported")
        jitter = inspect.signature(phimoe.sparsemixer).parameters["jitter_eps"].default  # vLLM's fixed threshold
    elif custom is not None:
        raise ValueError(f"vLLM routes {family} with {custom.__qualname__}, which moesteer does not model")
    if scoring_func != scoring.score_function:
        raise ValueError(
            f"vLLM scores the {family} routers with {scoring_func}, moesteer's {family} rule with "
            f"{scoring.score_function}; set scoring_func in the model's config.json"
        )
    if groups > 1 and not isinstance(scoring, GroupLimited):
        raise ValueError(f"vLLM routes {family} in {groups} expert groups, which moesteer's {family} rule has not")
    if isinstance(scoring, TopKSoftmax) and not renormalise:
        raise ValueError(f"vLLM routes {family} without renormalising, unlike moesteer's {family} rule")
    return RouterFacts(
        renormalise=renormalise,
        groups=groups,
        topk_group=int(getattr(router, "topk_group", None) or 1),
        routed_scaling=float(getattr(router, "routed_scaling_factor", 1.0)),
        correction_bias=getattr(router, "e_score_correction_bias", None),
        jitter_eps=jitter,
    )


@dataclass
class StepPlan:
    """The routing of one forward: ``(policy, tokens)`` groups (``tokens=None``: all), noise keys,
    and the token ranges ``(trace, row, start, end)`` of the traced sequences' branch requests."""

    groups: list[tuple[Policy | None, Tensor | None]]
    keys: TokenKeys
    traced: list[tuple[RoutingTrace, RowId, int, int]]


class RouterHook:
    """Installs into one vLLM worker (:meth:`install`, called in the worker's process)."""

    def __init__(self, registry: Registry, adapter: FamilyAdapter) -> None:
        self.registry, self.adapter = registry, adapter
        self.plan: StepPlan | None = None
        self.sites: dict[int, RouterSite] = {}
        self.edits = EditCache(self.sites)
        self.digest: hashlib._Hash | None = None  # of every steered (layer, experts, weights), when audited
        self.steered_calls = 0

    def audit(self) -> None:
        """Start a fresh digest of the steered routings (a device-to-host copy per router call)."""
        self.digest, self.steered_calls = hashlib.sha256(), 0

    # ---- installation ------------------------------------------------------------------------

    def install(self, worker) -> list[int]:
        """Patch the worker's runner and routers; returns the hooked decoder-layer indices."""
        runner = worker.model_runner
        routers = self._find_routers(runner.get_model())
        if not routers:
            raise ValueError("no fused-MoE routers found in the vLLM model")
        for moe_index, (layer, router) in enumerate(routers.items()):
            self.sites[layer] = RouterSite(layer, moe_index, len(routers), int(router.global_num_experts), router.top_k)
            facts = router_facts(router, self.adapter)
            router._compute_routing = MethodType(self._make_routing(layer, facts), router)
        original = runner._model_forward

        def model_forward(*args, positions: Tensor | None = None, **kwargs):
            self.plan = self._plan(runner, positions)
            try:
                return original(*args, positions=positions, **kwargs)
            finally:  # dummy and profiling runs call the model directly: they must see no plan
                self.plan = None

        runner._model_forward = model_forward
        return list(routers)

    @staticmethod
    def _find_routers(model: nn.Module) -> dict[int, nn.Module]:
        from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

        found = {}
        for name, module in model.named_modules():
            router = getattr(module, "router", None)
            if isinstance(router, FusedMoERouter):
                match = _LAYER.search(name + ".")
                if match is None:
                    raise ValueError(f"cannot tell the decoder layer of the MoE router in {name}")
                found[int(match.group(1))] = router
        return dict(sorted(found.items()))

    # ---- per step ----------------------------------------------------------------------------

    def _plan(self, runner, positions: Tensor) -> StepPlan:
        num_reqs = runner.input_batch.num_reqs
        starts = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
        pos = positions.detach().to("cpu", torch.long).reshape(-1)
        prompt, sample, branch = (torch.zeros_like(pos) for _ in range(3))
        by_policy: dict[int, tuple[Policy | None, list[Tensor]]] = {}
        traced: list[tuple[RoutingTrace, RowId, int, int]] = []
        seed = 0  # the routing-noise seed of the call in flight (calls do not overlap)
        self.registry.last_position.clear()
        for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            a, b = starts[i], starts[i + 1]
            found = self.registry.lookup(runner.requests[req_id].sampling_params.extra_args)
            policy, tokens = None, torch.arange(a, b)
            if found is not None:
                key, seq = found
                policy, seed = seq.branches[key[1]], seq.sampling.seed
                self.registry.last_position[key] = int(pos[b - 1])
                prompt[a:b], branch[a:b] = seq.prompt_key, key[1]
                sample[a:b] = torch.where(pos[a:b] < seq.prompt_len, 0, seq.sample)
                if seq.trace is not None:
                    traced.append((seq.trace, key, a, b))
                if isinstance(policy, Scoped):  # its positions take the policy, the others the model's routing
                    inside = policy.selects(pos[a:b], torch.tensor(seq.prompt_len))
                    by_policy.setdefault(id(None), (None, []))[1].append(tokens[~inside])
                    tokens = tokens[inside]
            by_policy.setdefault(id(policy), (policy, []))[1].append(tokens)
        if starts[num_reqs] < pos.shape[0]:  # padding tokens route as the model does
            by_policy.setdefault(id(None), (None, []))[1].append(torch.arange(starts[num_reqs], pos.shape[0]))
        if len(by_policy) == 1:
            groups: list[tuple[Policy | None, Tensor | None]] = [(next(iter(by_policy.values()))[0], None)]
        else:
            merged = [(policy, torch.cat(parts)) for policy, parts in by_policy.values()]
            groups = [(policy, tokens) for policy, tokens in merged if len(tokens)]  # as the HF hook
        decode = all(starts[i + 1] - starts[i] == 1 for i in range(num_reqs))
        return StepPlan(groups, TokenKeys(prompt, sample, branch, pos, seed, decode), traced)

    def _make_routing(self, layer: int, facts: RouterFacts):
        hook = self

        def compute_routing(router, hidden_states: Tensor, router_logits: Tensor, *args, **kwargs):
            original = type(router)._compute_routing.__get__(router)
            plan = hook.plan
            groups = [(hook.edits.get(policy, layer), tokens) for policy, tokens in plan.groups] if plan else []
            if not any(edit is not None for edit, _ in groups):
                weights, index = original(hidden_states, router_logits, *args, **kwargs)
                if plan is not None and plan.traced:
                    hook.record(plan, layer, index, weights, torch.ones_like(index, dtype=torch.bool))
                return weights, index

            def default(tokens: Tensor | None, n_slots: int):
                hidden = hidden_states if tokens is None else hidden_states[tokens]
                logits = router_logits if tokens is None else router_logits[tokens]
                weights, ids = original(hidden, logits, *args, **kwargs)
                return pad_selection(logits, ids, weights, n_slots)

            index, weights, active = route_tokens(
                hook.adapter.scoring,
                facts,
                hook.sites[layer],
                router_logits,
                groups,
                plan.keys,
                hidden_states.dtype,
                default,
            )
            if plan.traced:
                hook.record(plan, layer, index, weights, active)
            weights, index = weights.to(torch.float32).contiguous(), index.to(torch.int32).contiguous()
            if hook.digest is not None:
                hook.steered_calls += 1
                hook.digest.update(bytes([layer]) + index.cpu().numpy().tobytes() + weights.cpu().numpy().tobytes())
            return weights, index

        return compute_routing

    @staticmethod
    def record(plan: StepPlan, layer: int, index: Tensor, weights: Tensor, active: Tensor) -> None:
        """One router call into each traced branch request's trace, as the HF engine records a
        request's call: ``experts [1, tokens, K]`` (``-1`` = an inactive slot), ``weights`` and
        the tokens' positions, named by (sequence id, branch)."""
        experts = index.long().masked_fill(~active.to(index.device), -1).cpu()[None]
        weights, positions = weights.detach().float().cpu()[None], plan.keys.position.clone()[None]  # buffers move on
        for trace, row, a, b in plan.traced:  # views of the call's copies, one record per request
            trace.records.append(
                RouterRecord(layer, experts[:, a:b], weights[:, a:b], rows=(row,), positions=positions[:, a:b])
            )
