"""The next-token rule every backend shares: combine branches, then pick a token.

``scores = log_softmax(combine(branch log-probs))`` (EOS excluded when the strategy bans it);
greedy takes ``argmax``; sampling takes Gumbel-max over ``scores / T`` after top-k / top-p, with
noise keyed by (seed, prompt, sample, step), where step is the generated-token index (position −
origin) — never by batch row, call or backend, so the HF and vLLM engines sample the same tokens
from the same scores, and a resumed or forked decode draws what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moesteer.keys import gumbel_noise
from moesteer.sampling import SamplingParams
from moesteer.strategy import TokenStrategy

SAMPLING_LAYER = -1  # noise-key "layer" of token sampling, distinct from every router layer


class NonFiniteScores(ValueError):
    """A strategy's next-token scores are not a distribution (NaN, +inf, or every token excluded)."""


def chooser(strategy: TokenStrategy) -> TokenStrategy:
    """The strategy whose ``combine`` and ``bans_eos`` pick ``strategy``'s tokens, with as many
    branches: ``strategy.chooser()`` where it defines one (a strategy that only changes routing
    returns its inner strategy's), else ``strategy`` itself. Backends choose the tokens of all
    sequences with equal choosers in one call, whatever routing each sequence carries."""
    own = getattr(strategy, "chooser", None)
    return strategy if own is None else own()


def combined_scores(strategy: TokenStrategy, branch_logprobs: Tensor, eos: Sequence[int]) -> Tensor:
    """Log-probs ``[S, V]`` of the combined distribution from ``branch_logprobs [S, branches, V]``,
    unchecked: a row that is no distribution (NaN or +inf in, or every token excluded) comes out NaN."""
    combined = strategy.combine(branch_logprobs)
    if eos and strategy.bans_eos():
        combined[:, list(eos)] = float("-inf")
    return torch.log_softmax(combined, dim=-1)


def non_finite(strategy: TokenStrategy, step: int | None) -> NonFiniteScores:
    """The error for scores that are no distribution, at generated-token index ``step`` (``None``:
    a teacher-forced token)."""
    where = f"at step {step}" if step is not None else "for a teacher-forced token"
    return NonFiniteScores(
        f"{strategy} gave non-finite next-token scores {where} (NaN, inf or every token excluded); "
        "check its parameters (e.g. a huge beta or bias, or masks that exclude every token)"
    )


def next_token_scores(
    strategy: TokenStrategy, branch_logprobs: Tensor, eos: Sequence[int], steps: Tensor | None = None
) -> Tensor:
    """:func:`combined_scores`, checked: scores that are no distribution raise
    :class:`NonFiniteScores` naming the strategy and the generated-token index (``steps [S]``, when
    the caller knows it) instead of yielding token 0. The check reads the device (a host sync):
    per-step decoding uses :func:`next_tokens` instead."""
    scores = combined_scores(strategy, branch_logprobs, eos)
    bad = scores.isnan().any(-1)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise non_finite(strategy, int(steps[row]) if steps is not None else None)
    return scores


def next_tokens(
    strategy: TokenStrategy,
    branch_logprobs: Tensor,
    eos: Sequence[int],
    sampling: SamplingParams,
    keys: Tensor,
    tokens: Tensor | None = None,
) -> Tensor:
    """One decoding step of ``S`` sequences, without leaving the device: ``[S, 3]`` float64 rows of
    (chosen token, its combined log-prob, 1 if the scores are a distribution else 0).

    ``keys [3, S]`` are each sequence's (prompt, sample, step) noise keys, on the logits' device;
    ``tokens``, when given, are already chosen (a backend's own greedy sampler) and only scored.
    Token ids are exact in float64, so the caller moves the whole step to the host in one transfer."""
    scores = combined_scores(strategy, branch_logprobs, eos)
    if tokens is None:
        tokens = choose(scores, sampling, keys[0], keys[1], keys[2])
    logprob = scores.gather(-1, tokens[:, None]).squeeze(-1)
    finite = ~scores.isnan().any(-1)
    return torch.stack([tokens.double(), logprob.double(), finite.double()], dim=1)


def choose(scores: Tensor, sampling: SamplingParams, prompt: Tensor, sample: Tensor, step: Tensor) -> Tensor:
    """Greedy, or Gumbel-max sampling from ``softmax(scores / T)`` after top-k / top-p."""
    if sampling.temperature == 0:
        return scores.argmax(-1)
    logits = scores / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the token crossing top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    noise = gumbel_noise(sampling.seed, (prompt, sample, SAMPLING_LAYER, step), logits.shape[-1])  # on the keys' device
    return (logits + noise.to(logits.device)).argmax(-1)


def read_step(chosen: Tensor) -> list[list[float]]:
    """The one device-to-host transfer of a decoding step (a sync on a GPU): :func:`next_tokens`'
    rows of every group, concatenated, as Python lists."""
    return chosen.tolist()


def completion_text(tokenizer, tokens: list[int], eos: set[int], sampling: SamplingParams) -> str:
    """The text of generated ``tokens``: a final EOS dropped, cut before the first stop string."""
    if tokenizer is None:
        return ""
    shown = tokens[:-1] if tokens and tokens[-1] in eos and not sampling.ignore_eos else tokens
    text = tokenizer.decode(shown, skip_special_tokens=True)
    for stop in sampling.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return text
