"""Strategies above the routing policies: token strategies, controllers, and the front door.

``run(strategy, engine, prompts, sampling)`` runs any of them (``LM.generate`` calls it); specs
parse with :func:`parse` (``parse("scmoe(beta=0.5)")``). Routing policies live in
:mod:`moesteer.routing`.
"""

from moesteer.strategies.base import Controller, run
from moesteer.strategies.c3po import C3PO
from moesteer.strategies.combinators import WithK, WithPolicy
from moesteer.strategies.context import RunContext
from moesteer.strategies.des import DES, BeamSearch, BestOfN
from moesteer.strategies.rerouting import Rerouting
from moesteer.strategies.roe import RoE
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategies.self_consistency import SelfConsistency
from moesteer.strategies.spec import parse, register
from moesteer.strategy import Plain, Routed, Strategy, TokenStrategy, as_strategy

__all__ = [
    "C3PO",
    "DES",
    "BeamSearch",
    "BestOfN",
    "Controller",
    "Plain",
    "Rerouting",
    "RoE",
    "Routed",
    "RunContext",
    "SCMoE",
    "SelfConsistency",
    "Strategy",
    "TokenStrategy",
    "WithK",
    "WithPolicy",
    "as_strategy",
    "parse",
    "register",
    "run",
]
