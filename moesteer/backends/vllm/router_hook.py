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
  :func:`moesteer.routing.pipeline.route_tokens` under the family's rule (:mod:`moesteer.models.scoring`)
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
from dataclasses import dataclass
from types import MethodType

import torch
from torch import Tensor, nn

from moesteer.backends.vllm.registry import Registry
from moesteer.models.adapters import FamilyAdapter
from moesteer.models.scoring import GroupLimited, RouterFacts, SparseMixer, TopKSoftmax
from moesteer.routing import EditCache, Policy, RouterSite, Scoped
from moesteer.routing.call import TokenKeys, pad_selection
from moesteer.routing.pipeline import route_tokens
from moesteer.trace import RouterRecord, RoutingTrace, RowId


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


def refuse_monolithic(name: str, moe: nn.Module) -> None:
    """A one-line ``ValueError`` when vLLM runs the MoE layer ``name`` with a monolithic fused-MoE
    kernel: such a kernel takes the router logits and routes by itself, so the router (and
    steering) is never called. vLLM 0.32 picks one for gpt-oss MXFP4 on Hopper and for
    Renormalize-routed bf16 models (Qwen3-MoE, Mixtral) on Blackwell; a modular kernel fixes it."""
    if not getattr(moe, "is_monolithic", False):
        return
    method = getattr(getattr(moe, "routed_experts", None), "quant_method", None)
    kernel = type(method).__name__ if method is not None else type(moe).__name__
    raise ValueError(
        f"vLLM runs the MoE layer {name} with a monolithic kernel ({kernel}) that routes by itself, so steering "
        "cannot reach it; choose a modular kernel: moe_backend='marlin' (gpt-oss MXFP4 on Hopper) or "
        "moe_backend='triton' (Blackwell)"
    )


def host_positions(runner, starts: list[int], total: int) -> Tensor:
    """Each scheduled token's absolute position ``[total]``, from the runner's host-side batch
    state as vLLM computes its device ``positions``: the request's computed tokens plus the token's
    place in the request's chunk; padding tokens at 0, as vLLM pads them."""
    num_reqs = len(starts) - 1
    counts = torch.tensor(starts).diff()
    computed = torch.as_tensor(runner.input_batch.num_computed_tokens_cpu[:num_reqs], dtype=torch.long)
    within = torch.arange(starts[-1]) - torch.tensor(starts[:-1]).repeat_interleave(counts)
    positions = torch.zeros(total, dtype=torch.long)
    positions[: starts[-1]] = computed.repeat_interleave(counts) + within
    return positions


@dataclass
class StepPlan:
    """The routing of one forward: ``(policy, tokens)`` groups (``tokens=None``: all), noise keys,
    the tokens' positions on the host (for traces), the token ranges ``(trace, row, start, end)``
    of the traced sequences' branch requests, and whether any token is steered."""

    groups: list[tuple[Policy | None, Tensor | None]]
    keys: TokenKeys
    positions: Tensor
    traced: list[tuple[RoutingTrace, RowId, int, int]]
    steered: bool = False


class RouterHook:
    """Installs into one vLLM worker (:meth:`install`, called in the worker's process)."""

    def __init__(self, registry: Registry, adapter: FamilyAdapter) -> None:
        self.registry, self.adapter = registry, adapter
        self.plan: StepPlan | None = None
        self.sites: dict[int, RouterSite] = {}
        self.edits = EditCache(self.sites)
        self.digest: hashlib._Hash | None = None  # of every steered (layer, experts, weights), when audited
        self.steered_calls = 0
        self.routed_calls = 0  # hooked router calls in the forward in flight

    def audit(self) -> None:
        """Start a fresh digest of the steered routings (a device-to-host copy per router call)."""
        self.digest, self.steered_calls = hashlib.sha256(), 0

    # ---- installation ------------------------------------------------------------------------

    def install(self, worker) -> list[int]:
        """Patch the worker's runner and routers; returns the hooked decoder-layer indices."""
        runner = worker.model_runner
        routers = self._find_routers(runner.get_model(), self.adapter)
        if not routers:
            raise ValueError("no fused-MoE routers found in the vLLM model")
        for moe_index, (layer, router) in enumerate(routers.items()):
            self.hook_router(layer, moe_index, len(routers), router)
        self.hook_forward(runner)
        return list(routers)

    def hook_forward(self, runner) -> None:
        """Patch the runner's ``_model_forward``: build each step's plan first, and fail loudly if a
        step that steers tokens made no hooked router call (a kernel that routes by itself)."""
        original = runner._model_forward

        def model_forward(*args, positions: Tensor | None = None, **kwargs):
            self.plan, self.routed_calls = self._plan(runner, positions), 0
            try:
                output = original(*args, positions=positions, **kwargs)
                if self.plan.steered and not self.routed_calls:
                    raise RuntimeError(
                        "moesteer: this step steers tokens, but vLLM called none of the hooked MoE routers (a "
                        "fused-MoE kernel that routes by itself?); steering would be silently lost"
                    )
                return output
            finally:  # dummy and profiling runs call the model directly: they must see no plan
                self.plan = None

        runner._model_forward = model_forward

    def hook_router(self, layer: int, moe_index: int, num_moe_layers: int, router) -> None:
        """Patch one fused-MoE router's ``_compute_routing`` (decoder layer ``layer``)."""
        self.sites[layer] = RouterSite(layer, moe_index, num_moe_layers, int(router.global_num_experts), router.top_k)
        facts = router_facts(router, self.adapter)
        router._compute_routing = MethodType(self._make_routing(layer, facts), router)

    @staticmethod
    def _find_routers(model: nn.Module, adapter: FamilyAdapter) -> dict[int, nn.Module]:
        """``{decoder layer: its fused-MoE router}``; a layer whose kernel never calls the router is
        refused (:func:`refuse_monolithic`)."""
        from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

        found = {}
        for name, module in model.named_modules():
            router = getattr(module, "router", None)
            if isinstance(router, FusedMoERouter):
                layer = adapter.layer_of(name)
                if layer is None:
                    raise ValueError(f"cannot tell the decoder layer of the MoE router in {name}")
                refuse_monolithic(name, module)
                found[layer] = router
        return dict(sorted(found.items()))

    # ---- per step ----------------------------------------------------------------------------

    def _plan(self, runner, positions: Tensor) -> StepPlan:
        """The step's plan, built on the host from the runner's CPU-side batch state (no device
        read), then moved to ``positions.device`` in one host-to-device copy."""
        num_reqs = runner.input_batch.num_reqs
        starts = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
        pos = host_positions(runner, starts, positions.shape[-1])
        prompt, sample, branch, seed = (torch.zeros_like(pos) for _ in range(4))
        by_policy: dict[int, tuple[Policy | None, list[Tensor]]] = {}
        traced: list[tuple[RoutingTrace, RowId, int, int]] = []
        self.registry.last_position.clear()
        for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            a, b = starts[i], starts[i + 1]
            found = self.registry.lookup(runner.requests[req_id].sampling_params.extra_args)
            policy, tokens = None, torch.arange(a, b)
            if found is not None:
                key, seq = found
                policy = seq.branches[key[1]]
                self.registry.last_position[key] = int(pos[b - 1])
                prompt[a:b], branch[a:b], seed[a:b] = seq.prompt_key, key[1], seq.sampling.seed
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
            host_groups: list[tuple[Policy | None, Tensor | None]] = [(next(iter(by_policy.values()))[0], None)]
        else:
            merged = [(policy, torch.cat(parts)) for policy, parts in by_policy.values()]
            host_groups = [(policy, tokens) for policy, tokens in merged if len(tokens)]  # as the HF hook
        decode = all(starts[i + 1] - starts[i] == 1 for i in range(num_reqs))
        bound = int(pos.max()) + 1 if len(pos) else 0
        # the step's one host-to-device copy: keys and every group's token indices, as one tensor
        parts = [prompt, sample, branch, pos, seed, *(t for _, t in host_groups if t is not None)]
        on_device = iter(torch.cat(parts).to(positions.device).split([len(t) for t in parts]))
        keys = TokenKeys(*(next(on_device) for _ in range(5)), decode=decode, bound=bound)  # parts' order
        groups = [(policy, None if tokens is None else next(on_device)) for policy, tokens in host_groups]
        return StepPlan(groups, keys, pos, traced, steered=any(policy is not None for policy, _ in groups))

    def _make_routing(self, layer: int, facts: RouterFacts):
        hook = self

        def compute_routing(router, hidden_states: Tensor, router_logits: Tensor, *args, **kwargs):
            original = type(router)._compute_routing.__get__(router)
            plan = hook.plan
            hook.routed_calls += 1
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
        weights, positions = weights.detach().float().cpu()[None], plan.positions[None]  # the plan's own host copy
        for trace, row, a, b in plan.traced:  # views of the call's copies, one record per request
            trace.records.append(
                RouterRecord(layer, experts[:, a:b], weights[:, a:b], rows=(row,), positions=positions[:, a:b])
            )
