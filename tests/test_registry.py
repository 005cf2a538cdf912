"""Name tables (moesteer.registry) and the key=value lists of the command line (moesteer.checks)."""

from __future__ import annotations

import math

import pytest

from moesteer.checks import parse_kv, split_top_level
from moesteer.registry import Registry


def test_lazy_entries_are_imported_on_first_use():
    table: Registry[object] = Registry("kernel", {"sqrt": "math:sqrt", "gone": "no_such_module:thing", "pi": math.pi})
    assert table.get("sqrt") is math.sqrt and table["sqrt"] is math.sqrt
    assert table["pi"] == math.pi
    with pytest.raises(ModuleNotFoundError):
        table.get("gone")


def test_names_are_sorted_and_iteration_keeps_registration_order():
    table: Registry[int] = Registry("group", {"b": 1, "a": 2})
    table.register("c", 3)
    assert table.names() == ["a", "b", "c"]
    assert list(table) == ["b", "a", "c"]
    assert "a" in table and "z" not in table


def test_a_taken_name_needs_replace():
    table: Registry[int] = Registry("task", {"arith": 1})
    with pytest.raises(ValueError, match="task 'arith' is already registered; pass replace=True"):
        table.register("arith", 2)
    table.register("arith", 2, replace=True)
    assert table["arith"] == 2


def test_an_unknown_name_is_one_line_with_a_hint_and_the_known_names():
    table: Registry[int] = Registry("strategy", {"topk": 1, "scmoe": 2})
    with pytest.raises(ValueError) as err:
        table.get("tpk")
    assert str(err.value) == "unknown strategy 'tpk' (did you mean 'topk'?); known: scmoe, topk"
    assert table.unknown("zzz") == "unknown strategy 'zzz'; known: scmoe, topk"


def test_parse_kv():
    assert parse_kv(["k=1", " beta = 0.5 ", "s=scmoe(beta=1)"]) == {"k": "1", "beta": "0.5", "s": "scmoe(beta=1)"}
    for bad in ("k", "=1", "1k=2", "a b=1"):
        with pytest.raises(ValueError, match=r"bad parameter .*: expected KEY=VALUE, e\.g\. beta=0\.5"):
            parse_kv([bad])
    with pytest.raises(ValueError, match=r"^model argument 'k' is given twice$"):
        parse_kv(["k=1", "k=2"], "model argument")


def test_split_top_level_keeps_bracketed_commas():
    assert split_top_level("a=1,s=scmoe(beta=0.5, alpha=0.1), m=mask([1, 2]),,") == [
        "a=1",
        "s=scmoe(beta=0.5, alpha=0.1)",
        " m=mask([1, 2])",
    ]
    assert split_top_level("") == []
