"""Strategy specs as text, and the strategy registry.

A spec is a call expression: ``scmoe(beta=0.5)``, ``self_consistency(roe(samples=4), n=8)``,
``ranks(2)``. It is parsed with :mod:`ast` (never evaluated): only registered names, numbers,
strings, booleans, ``None`` and tuples/lists are allowed. ``to_spec`` prints the parameters a spec
gave (in its order), then any others that differ from their defaults, so ``to_spec(parse(s)) == s``
for a spec written in canonical spacing, and ``parse(to_spec(x)) == x`` for any strategy ``x``.
"""

from __future__ import annotations

import ast
import dataclasses
import typing

from moesteer.checks import did_you_mean
from moesteer.printer import parameters, to_spec
from moesteer.registry import Registry
from moesteer.strategy import Strategy, as_strategy

__all__ = ["STRATEGIES", "names", "parameters", "parse", "register", "resolve", "to_spec"]

STRATEGIES: Registry[type] = Registry(
    "strategy",
    {
        "plain": "moesteer.strategy:Plain",
        "scmoe": "moesteer.strategies.scmoe:SCMoE",
        "roe": "moesteer.strategies.roe:RoE",
        "self_consistency": "moesteer.strategies.self_consistency:SelfConsistency",
        "with_k": "moesteer.strategies.combinators:WithK",
        "des": "moesteer.strategies.des:DES",
        "beam_search": "moesteer.strategies.des:BeamSearch",
        "best_of_n": "moesteer.strategies.des:BestOfN",
        "c3po": "moesteer.strategies.c3po:C3PO",
        "rerouting": "moesteer.strategies.rerouting:Rerouting",
        "random_experts": "moesteer.routing:RandomExperts",
        "rank_after_topk": "moesteer.routing:RankAfterTopK",
        "topk": "moesteer.routing:TopK",
        "topp": "moesteer.routing:TopP",
        "steermoe": "moesteer.routing:SteerMoE",
        "rice": "moesteer.routing:RICE",
        "capacity": "moesteer.routing:Capacity",
        "replay": "moesteer.routing:ReplayFile",
        "ranks": "moesteer.routing:Ranks",
        "gumbel": "moesteer.routing:Gumbel",
        "mask": "moesteer.routing:Mask",
        "force": "moesteer.routing:Force",
    },
)
"""Strategy and routing-primitive classes by spec name (``"module:attr"`` entries load on first use)."""


def register(name: str, target: str | type, *, replace: bool = False) -> None:
    """Register a strategy (or routing primitive) class under ``name`` (``"module:attr"`` is lazy)."""
    if not name.isidentifier():
        raise ValueError(f"strategy name {name!r} must be a Python identifier")
    STRATEGIES.register(name, target, replace=replace)


def names() -> list[str]:
    """The registered strategy names, sorted."""
    return STRATEGIES.names()


def resolve(name: str) -> type:
    """The class registered as ``name``; a "did you mean" ``ValueError`` for unknown names."""
    return STRATEGIES.get(name)


def parse(text: str) -> Strategy:
    """Build a strategy from its spec; a one-line ``ValueError`` naming what is wrong."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse strategy spec {text!r}; expected e.g. scmoe(beta=0.5)") from None
    node = tree.body
    if isinstance(node, ast.Name):  # bare name: `plain`, `scmoe`
        node = ast.Call(func=node, args=[], keywords=[])
    return as_strategy(_build(node, text))


def _build(node: ast.expr, text: str) -> object:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        cls = resolve(node.func.id)
        args = [_build(a, text) for a in node.args]
        kwargs: dict[str, object] = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise ValueError(f"unsupported **{ast.unparse(kw.value)} in strategy spec {text!r}; write key=value")
            if kw.arg in kwargs:
                raise ValueError(f"{node.func.id}: parameter {kw.arg!r} is given twice in strategy spec {text!r}")
            kwargs[kw.arg] = _build(kw.value, text)
        return _construct(node.func.id, cls, args, kwargs)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str | bool | type(None)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_build(e, text) for e in node.elts)
    raise ValueError(f"unsupported expression {ast.unparse(node)!r} in strategy spec {text!r}")


def _construct(name: str, cls: type, args: list, kwargs: dict) -> object:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in known:
            allowed = ", ".join(known) or "none"
            raise ValueError(f"{name} has no parameter {key!r}{did_you_mean(key, known)}; parameters: {allowed}")
    hints = typing.get_type_hints(cls)
    for key, value in kwargs.items():
        if hints.get(key) is float and isinstance(value, int) and not isinstance(value, bool):
            kwargs[key] = float(value)
    try:
        obj = cls(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"{name}: {err}") from None
    object.__setattr__(obj, "_spec_keys", tuple(kwargs))  # printed back as given; not part of equality
    return obj
