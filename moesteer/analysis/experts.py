"""Expert discovery: which (layer, expert) pairs are tied to a behaviour or a marker token.

Two detectors over teacher-forced forwards of the model's own routing (either backend's ``routing``):

* **risk difference** (SteerMoE, Fayyaz et al., arXiv 2509.09660): for paired or labelled prompt
  sets, over the tokens of each record's behaviour span, Δ_{l,i} = A⁺_{l,i}/N⁺ − A⁻_{l,i}/N⁻ with
  A the number of span tokens whose top-k at layer l holds expert i and N the number of span
  tokens; ranked by |Δ| (Δ > 0: the positive set's experts);
* **nPMI** (RICE, Wang et al., arXiv 2505.14681): between "the token is the marker" and "expert i
  is in the token's top-k at layer l", over every token of the texts:
  PMI = log₂ p(x, E) / (p(x) p(E)), nPMI = PMI / −log₂ p(x, E) ∈ [−1, 1]; ranked by nPMI.

A record is ``{"text": ...}`` (the span is the whole text) or ``{"prompt": ..., "span": ...}`` (the
span is ``span``, read after ``prompt``). The result is an :class:`ExpertTable`, saved as JSON,
that ``steermoe`` and ``rice`` load.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moesteer.expert_table import ExpertScore, ExpertTable


@torch.no_grad()
def selections(engine, records: list[dict], policy=None) -> tuple[list[Tensor], list[list[int]]]:
    """Per record: the top-k membership ``[tokens, L, E]`` (bool) of its span tokens under
    ``policy`` (``None``: the model's routing), and their ids."""
    out, ids = [], []
    experts, _ = engine.routing_sizes()
    layers = engine.moe_layers
    for i, record in enumerate(records):
        prompt, span = _split(record, i)
        prompt_ids = engine.encode(prompt) if prompt else []
        span_ids = engine.encode(span, special=not prompt_ids)
        tokens = prompt_ids + span_ids
        member = torch.zeros(len(tokens), len(layers), experts, dtype=torch.bool)
        for r in engine.routing(tokens, policy).values():
            chosen = r.experts[0]  # [T, K], -1 = inactive
            column = layers.index(r.layer)
            for slot in range(chosen.shape[-1]):
                valid = chosen[:, slot] >= 0
                member[valid.nonzero().flatten(), column, chosen[valid, slot]] = True
        out.append(member[len(prompt_ids) :])
        ids.append(span_ids)
    return out, ids


def span_load(engine, records: list[dict], policy=None) -> tuple[Tensor, int]:
    """``[L, E]``: how many span tokens of the records each expert took, per MoE layer; and the
    number of span tokens."""
    member, ids = selections(engine, records, policy)
    return torch.cat(member).sum(0).long(), sum(len(span) for span in ids)


def _split(record: dict, index: int) -> tuple[str, str]:
    if "text" in record:
        return "", str(record["text"])
    if "span" in record:
        return str(record.get("prompt", "")), str(record["span"])
    raise ValueError(f"record {index + 1}: give 'text', or 'prompt' and 'span'")


def risk_difference(engine, positive: list[dict], negative: list[dict]) -> ExpertTable:
    """SteerMoE's Δ between the positive and negative records' span tokens, ranked by |Δ|."""
    (pos, _), (neg, _) = selections(engine, positive), selections(engine, negative)
    a_pos, a_neg = torch.cat(pos).sum(0), torch.cat(neg).sum(0)  # [L, E]
    n_pos, n_neg = sum(len(p) for p in pos), sum(len(n) for n in neg)
    if not n_pos or not n_neg:
        raise ValueError("risk difference: both sets need at least one span token")
    delta = a_pos / n_pos - a_neg / n_neg
    rows = [
        ExpertScore(
            layer, e, float(delta[j, e]), {"A+": int(a_pos[j, e]), "N+": n_pos, "A-": int(a_neg[j, e]), "N-": n_neg}
        )
        for j, layer in enumerate(engine.moe_layers)
        for e in range(delta.shape[1])
    ]
    rows.sort(key=lambda r: (-abs(r.score), r.layer, r.expert))
    return _table("risk_difference", engine, rows)


def npmi(engine, records: list[dict], marker: str) -> ExpertTable:
    """RICE's nPMI between the marker token and each expert, over every token, ranked by nPMI."""
    marker_ids = engine.encode(marker, special=False)
    if len(marker_ids) != 1:
        raise ValueError(f"marker {marker!r} is {len(marker_ids)} tokens for this tokenizer; give a single token")
    member, ids = selections(engine, [{"text": "".join(_split(r, i))} for i, r in enumerate(records)])
    chosen, is_marker = torch.cat(member), torch.tensor([t == marker_ids[0] for s in ids for t in s])
    total, with_marker = len(is_marker), int(is_marker.sum())
    if not with_marker:
        raise ValueError(f"marker {marker!r} does not occur in the texts")
    joint = chosen[is_marker].sum(0)  # [L, E]
    active = chosen.sum(0)
    rows = []
    for j, layer in enumerate(engine.moe_layers):
        for e in range(chosen.shape[-1]):
            both, alone = int(joint[j, e]), int(active[j, e])
            score = _npmi(both / total, with_marker / total, alone / total)
            rows.append(
                ExpertScore(
                    layer, e, score, {"marker&expert": both, "marker": with_marker, "expert": alone, "tokens": total}
                )
            )
    rows.sort(key=lambda r: (-r.score, r.layer, r.expert))
    return _table("npmi", engine, rows)


def _npmi(joint: float, marker: float, expert: float) -> float:
    if joint == 0:
        return -1.0
    if joint == 1:
        return 1.0
    return math.log2(joint / (marker * expert)) / -math.log2(joint)


def _table(method: str, engine, rows: list[ExpertScore]) -> ExpertTable:
    experts, _ = engine.routing_sizes()
    return ExpertTable(method, engine.name, tuple(engine.moe_layers), experts, tuple(rows))
