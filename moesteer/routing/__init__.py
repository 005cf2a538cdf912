"""Routing policies: which experts one MoE router call selects, and with what weights.

A policy is an ordered tuple of primitives (``TopK(1) + Bias(b)``). For one router call (one MoE
layer, one group of batch rows) each primitive writes its slot algebra (k, ranks, forced and
masked experts) and its stages into a :class:`RouterEdit`; the pipeline
(:mod:`moesteer.routing.pipeline`) then turns the model's own router logits plus that edit into
expert ids and mixing weights, keeping the family's normalisation (softmax or sigmoid, correction
bias, group-limited top-k, renormalisation, routed scaling) (:mod:`moesteer.models.scoring`).
Whatever order the primitives come in, one call runs these stages in this order:

1. logits: ``z ← router_logits`` edited (``Bias`` adds, SteerMoE moves experts); masked experts get
   ``−inf`` (this moves selection *and* weights);
2. noise: ``key ← score(z + τ·G)`` with ``G`` standard Gumbel noise (selection only);
3. key: a rule may select by another key (random experts, C3PO's ω); forced experts ``+inf``;
   the slots: the first ``k`` experts of the key (``k`` defaults to the trained top-k, may exceed
   it up to all experts), or the given ranks (counted from 1) — forced experts come first, ranks
   and ``k`` then count the remaining experts;
4. active: which selected slots carry weight (top-p, expert-choice capacity);
5. weights: the family's rule on the selected experts from the noise-free ``z``, then edited
   (rescale factors, capacity drops, ω).

Later primitives override earlier ones for ``k`` and ranks; masks and forces accumulate; stages
run in the policy's order within each stage. One file per family of rules: :mod:`.basic`,
:mod:`.noise`, :mod:`.topp`, :mod:`.capacity`, :mod:`.steering`, :mod:`.replay`. A new rule is one
:class:`Primitive` subclass that overrides the stage hooks it needs (or :class:`RouterLogits` of a
function); both backends run it through the same pipeline. Shapes: ``T`` token rows, ``E``
experts, ``K`` selection slots.
"""

from moesteer.routing.basic import (
    SCOPES,
    Bias,
    ExpertValues,
    Force,
    Mask,
    OnLayers,
    RankAfterTopK,
    Ranks,
    Rescale,
    RouterLogits,
    Scoped,
    SetWeights,
    TopK,
)
from moesteer.routing.call import RouterCall, RouterSite
from moesteer.routing.capacity import CAPACITY_ORDERS, Capacity
from moesteer.routing.noise import Gumbel, RandomExperts
from moesteer.routing.pipeline import EditCache
from moesteer.routing.policy import Policy, Primitive, RouterEdit, RoutingPolicy, Stage, policy_fingerprint
from moesteer.routing.replay import Replay, ReplayFile
from moesteer.routing.steering import RICE, STEER_MODES, SteerMoE, expert_table
from moesteer.routing.topp import TopP

__all__ = [
    "CAPACITY_ORDERS",
    "RICE",
    "SCOPES",
    "STEER_MODES",
    "Bias",
    "Capacity",
    "EditCache",
    "ExpertValues",
    "Force",
    "Gumbel",
    "Mask",
    "OnLayers",
    "Policy",
    "Primitive",
    "RandomExperts",
    "RankAfterTopK",
    "Ranks",
    "Replay",
    "ReplayFile",
    "Rescale",
    "RouterCall",
    "RouterEdit",
    "RouterLogits",
    "RouterSite",
    "RoutingPolicy",
    "Scoped",
    "SetWeights",
    "Stage",
    "SteerMoE",
    "TopK",
    "TopP",
    "expert_table",
    "policy_fingerprint",
]
