"""Measurements of a trained embedded model: greedy completions and routing statistics.

Routing statistics count the router's top-k choices over the non-pad tokens of gold sequences:
per layer, the share of assignments each expert gets, its normalised entropy
``H(share) / ln E`` (1.0 = perfectly balanced), the number of dead experts (share below a tenth
of uniform, ``1 / (10 E)``), and the normalised mutual information between a token's group
(e.g. task family) and its top-1 expert, ``I(group; expert) / H(group)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEAD_SHARE = 0.1
"""An expert is dead when its share of assignments is below this fraction of the uniform share."""


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 100,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy decode each prompt (batched, left padding); the completions' texts.

    A row ends at ``<eos>`` or once it contains a ``stop`` string (the text after it is kept:
    the caller cuts it), so a batch ends when every row has.
    """
    texts: list[str] = []
    stopping = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start : start + batch_size]), padding=True, return_tensors="pt")
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, output_router_logits=False, **stopping
        )
        texts += tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return texts


@torch.no_grad()
def routing_counts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    groups: Sequence[int],
    n_groups: int,
    keep_characters: str | None = None,
    batch_size: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k and top-1 assignment counts ``[layer, group, expert]`` over the texts' tokens.

    ``groups[i]`` is text i's group; ``keep_characters`` counts only tokens that are one of them
    (e.g. digits); ``None`` counts every non-pad token.
    """
    config = model.config
    shape = (config.num_hidden_layers, n_groups, config.num_experts)
    top_k, top_1 = torch.zeros(shape), torch.zeros(shape)
    kept_ids = (
        torch.tensor(tokenizer.convert_tokens_to_ids(list(keep_characters))) if keep_characters is not None else None
    )
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, return_tensors="pt")
        out = model(**enc, output_router_logits=True)
        keep = enc.attention_mask.bool()
        if kept_ids is not None:
            keep &= torch.isin(enc.input_ids, kept_ids)
        keep = keep.flatten()
        group = torch.tensor(groups[start : start + batch_size]).repeat_interleave(enc.input_ids.shape[1])[keep]
        for layer, logits in enumerate(out.router_logits):
            chosen = logits[keep].topk(config.num_experts_per_tok, dim=-1).indices
            flat = group.repeat_interleave(chosen.shape[1]) * config.num_experts + chosen.flatten()
            top_k[layer] += torch.bincount(flat, minlength=n_groups * config.num_experts).view(shape[1:]).float()
            first = group * config.num_experts + chosen[:, 0]
            top_1[layer] += torch.bincount(first, minlength=n_groups * config.num_experts).view(shape[1:]).float()
    return top_k, top_1


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def load_stats(counts: torch.Tensor) -> list[dict[str, float]]:
    """Per layer of ``[layer, (group,) expert]`` counts: load entropy / ln E, max share, dead experts."""
    if counts.dim() == 3:
        counts = counts.sum(1)
    n_experts = counts.shape[-1]
    shares = counts / counts.sum(-1, keepdim=True)
    entropy = _entropy(shares) / math.log(n_experts)
    dead = (shares < DEAD_SHARE / n_experts).sum(-1)
    return [
        {"load_entropy": round(h.item(), 4), "max_share": round(s.max().item(), 4), "dead_experts": int(d)}
        for h, s, d in zip(entropy, shares, dead, strict=True)
    ]


def group_expert_information(counts: torch.Tensor) -> list[float]:
    """Per layer of top-1 counts ``[layer, group, expert]``: I(group; expert) / H(group)."""
    joint = counts / counts.sum((-2, -1), keepdim=True)
    group, expert = joint.sum(-1), joint.sum(-2)
    information = _entropy(group) + _entropy(expert) - _entropy(joint.flatten(1))
    return [round((i / h).item(), 4) for i, h in zip(information, _entropy(group), strict=True)]
