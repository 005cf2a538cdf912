"""Expert steering from a table of discovered experts: SteerMoE's (de)activation and RICE's
reinforcement (tables written by ``moesteer experts``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from moesteer.expert_table import ExpertTable
from moesteer.json_files import read_cached
from moesteer.routing.basic import AddLogits, ScaleWeights
from moesteer.routing.call import RouterCall, RouterSite, expert_mask
from moesteer.routing.policy import Primitive, RouterEdit, Stage


def expert_table(path: str) -> ExpertTable:
    """The :class:`moesteer.expert_table.ExpertTable` at ``path`` (read once while the file is unchanged)."""
    return read_cached(ExpertTable.load, path)


STEER_MODES = ("hard", "soft", "add")


@dataclass(frozen=True)
class SteerMoE(Primitive):
    """SteerMoE (Fayyaz et al., arXiv 2509.09660): switch discovered experts on or off. From the
    expert table ``experts`` (``moesteer experts``), the first ``activate`` rows with a positive
    score are activated and the first ``deactivate`` with a negative score deactivated
    (``reverse`` swaps the signs), at every token of their layers, by ``mode``:

    * ``'hard'``, the paper's rule: on s = log_softmax(z), s_i ← max_j s_j + ``margin`` (activate;
      at most the trained top-k a layer, the rest skipped, as the released code) or
      s_i ← min_j s_j − ``margin`` (deactivate); then the family's rule on s;
    * ``'soft'``, EasySteer's soft router mode: z_i ← z_i ± ``strength``·std_j(z_j) (the step scales
      with the token's spread of router logits);
    * ``'add'``: z_i ← z_i ± ``strength`` (for softmax routers, p_i scaled by e^±strength and
      renormalised: "scale an expert's probability"; a raw logit is not scaled, as its sign would
      flip the direction).

    The soft modes move every chosen expert (no top-k cap); ``strength=0`` is the model's routing.

    Args:
        experts: the expert table file (``moesteer experts``).
        activate: how many of the table's positive-score experts to switch on.
        deactivate: how many of the table's negative-score experts to switch off.
        reverse: swap the signs (steer towards the other behaviour).
        mode: 'hard' (the paper's rule), 'soft' or 'add'.
        margin: 'hard': how far above the best (below the worst) score a steered expert goes.
        strength: 'soft' / 'add': the size of the logit step.

    Example: steermoe('experts.json', activate=2)
    """

    name: ClassVar[str] = "steermoe"
    paper: ClassVar[str] = "Steering MoE LLMs via Expert (De)Activation (Fayyaz et al., arXiv 2509.09660)"
    files: ClassVar[tuple[str, ...]] = ("experts",)

    experts: str
    activate: int = 0
    deactivate: int = 0
    reverse: bool = False
    mode: str = "hard"
    margin: float = 0.01
    strength: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in STEER_MODES:
            raise ValueError(f"SteerMoE: mode must be one of {', '.join(STEER_MODES)}, got {self.mode!r}")
        for field_name in ("activate", "deactivate"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SteerMoE: {field_name} must be an integer >= 0, got {value!r}")
        for field_name in ("margin", "strength"):
            value = getattr(self, field_name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SteerMoE: {field_name} must be a finite number >= 0, got {value!r}")

    def sets(self) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
        table, sign = expert_table(self.experts), -1 if self.reverse else 1
        return table.top(self.activate, sign), table.top(self.deactivate, -sign)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        on, off = self.sets()
        hard = self.mode == "hard"
        chosen_on, chosen_off = on.get(site.layer, ())[: site.top_k if hard else None], off.get(site.layer, ())
        if not chosen_on and not chosen_off:
            return False
        amount = float(self.margin if hard else self.strength)
        edit.stages.append(SteerLogits(tuple(chosen_on), tuple(chosen_off), self.mode, amount))
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        _check_table(expert_table(self.experts), num_experts, moe_layers, "SteerMoE")


@dataclass(frozen=True)
class RICE(Primitive):
    """Reinforce an expert table's ``count`` best experts by β.

    RICE (Wang et al., arXiv 2505.14681): reinforce the ``count`` experts with the highest
    score in the expert table ``experts`` (nPMI with a marker, ``moesteer experts --marker``) by
    β = ``beta`` at every token. ``variant='logit'``: z_i ← z_i + log β before selection (= β·p_i
    renormalised over all experts for softmax routers; it can pull the expert into the top-k);
    ``'weight'``: its mixing weight × β when selected. β = 1 is the model's routing.

    Args:
        experts: the expert table file (``moesteer experts --marker``).
        beta: reinforcement factor β > 0 (1 = the model's routing).
        count: how many of the table's best experts to reinforce.
        variant: 'logit' (z + log β before selection) or 'weight' (weight × β when selected).

    Example: rice('experts.json', beta=8.0)
    """

    name: ClassVar[str] = "rice"
    paper: ClassVar[str] = (
        "Two Experts Are All You Need for Steering Thinking: Reinforcing Cognitive Effort in MoE Reasoning Models "
        "Without Additional Training (Wang et al., arXiv 2505.14681)"
    )
    files: ClassVar[tuple[str, ...]] = ("experts",)

    experts: str
    beta: float = 64.0
    count: int = 2
    variant: str = "logit"

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"RICE: beta must be a positive number, got {self.beta!r}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"RICE: count must be an integer >= 1, got {self.count!r}")
        if self.variant not in ("logit", "weight"):
            raise ValueError(f"RICE: variant must be 'logit' or 'weight', got {self.variant!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        chosen = expert_table(self.experts).top(self.count, 1).get(site.layer, ())
        if not chosen:
            return False
        if self.variant == "weight":
            edit.stages.append(ScaleWeights(dict.fromkeys(chosen, float(self.beta))))
        else:
            bias = torch.zeros(site.num_experts)
            bias[list(chosen)] = math.log(self.beta)
            edit.stages.append(AddLogits(bias))
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        _check_table(expert_table(self.experts), num_experts, moe_layers, "RICE")


def _check_table(table, num_experts: int, moe_layers: tuple[int, ...], name: str) -> None:
    if (table.num_experts, tuple(table.moe_layers)) != (num_experts, tuple(moe_layers)):
        raise ValueError(
            f"{name}: the expert table covers {table.num_experts} experts in MoE layers {list(table.moe_layers)}; "
            f"the model has {num_experts} in {list(moe_layers)}"
        )


@dataclass(frozen=True)
class SteerLogits(Stage):
    """SteerMoE's edit of the logits z (amount a): ``'hard'``, on s = log_softmax(z), activated
    s_i = max s + a and deactivated s_i = min s − a (the family's rule then runs on s); ``'soft'``,
    z_i ± a·std(z); ``'add'``, z_i ± a."""

    on: tuple[int, ...]
    off: tuple[int, ...]
    mode: str
    amount: float

    def on_logits(self, call: RouterCall) -> None:
        logits = call.logits
        if self.mode == "hard":
            s = torch.log_softmax(logits.float(), dim=-1)
            high = s.max(-1, keepdim=True).values + self.amount
            low = s.min(-1, keepdim=True).values - self.amount
        else:
            s = logits.float()
            step = self.amount * (s.std(-1, keepdim=True) if self.mode == "soft" else torch.ones_like(s[:, :1]))
            high, low = s + step, s - step
        if self.on:
            s = torch.where(expert_mask(self.on, s), high, s)
        if self.off:
            s = torch.where(expert_mask(self.off, s), low, s)
        call.logits = s.to(logits.dtype)
