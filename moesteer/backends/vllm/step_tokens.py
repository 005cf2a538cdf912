"""Each step's next token of every sequence whose branch rows all sample now, written into its rows.

The rule is :mod:`moesteer.decoding`'s (``combine`` over the branches' log-probs, EOS ban, greedy
or Gumbel-max sampling keyed like the HF engine); the result is a one-hot row (0 at the chosen
token, −inf elsewhere) in **every** branch row, so vLLM's greedy sampler appends the same token to
all of them. Everything stays on the logits' device; the chosen log-probs and the finiteness checks
cross to the host in one transfer per step. Nothing raises inside vLLM's step (that would end the
engine): a sequence whose scores are no distribution, or whose branches were not scheduled
together, keeps the error (:func:`~.registry.error_data`) and is ended with EOS; the engine
raises it when the call returns. No vLLM import: :mod:`.combiner` adapts this to vLLM's
logits-processor interface, and the device checks drive it directly.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from moesteer.backends.base import identity_key
from moesteer.backends.vllm.registry import Registry, SplitBranches, error_data
from moesteer.decoding import chooser, next_tokens, non_finite, read_step
from moesteer.trace import RowId

Row = tuple[RowId, list[int]]  # (row key, the request's live output token list)


def combine_rows(registry: Registry, logits: Tensor, rows: dict[int, Row]) -> None:
    """Choose the next token of every ready sequence and write it into its branch rows, in place."""
    by_sequence: dict[int, dict[int, tuple[int, list[int]]]] = defaultdict(dict)
    for row, ((seq_id, branch), output) in rows.items():
        if seq_id in registry.sequences:
            by_sequence[seq_id][branch] = (row, output)
    if not by_sequence:
        return
    ready: dict[tuple[object, int], list[tuple[int, list[int]]]] = defaultdict(list)  # (chooser, sampling) -> seqs
    for seq_id, branches in by_sequence.items():
        seq = registry.sequences[seq_id]
        if seq.error is not None:
            _end(seq.eos, logits, [row for row, _ in branches.values()])
            continue
        samples_now = [
            registry.last_position.get((seq_id, b)) == seq.prompt_len + len(out) - 1 for b, (_, out) in branches.items()
        ]
        if not any(samples_now):
            continue
        if not all(samples_now) or len(branches) != len(seq.branches):  # ended, never raised in vLLM's step
            seq.error = error_data(
                SplitBranches(
                    f"moesteer: only {sum(samples_now)} of the {len(seq.branches)} branches of sequence {seq_id} were "
                    "scheduled in this step; raise max_num_seqs / max_num_batched_tokens or lower the batch"
                )
            )
            _end(seq.eos, logits, [row for row, _ in branches.values()])
            continue
        rows_of_seq = [branches[b][0] for b in range(len(seq.branches))]
        ready[(identity_key(chooser(seq.strategy)), id(seq.sampling))].append((seq_id, rows_of_seq))
    if not ready:
        return
    chosen = [_choose_group(registry, logits, group) for group in ready.values()]
    results = read_step(torch.cat(chosen))
    done = [(seq_id, rows) for group in ready.values() for seq_id, rows in group]
    for (seq_id, rows), (_, logprob, finite) in zip(done, results, strict=True):
        seq = registry.sequences[seq_id]
        if finite:
            seq.logprobs.append(logprob)
        else:  # ended here, raised by the engine when the call returns
            seq.error = error_data(non_finite(seq.strategy, seq.offset + len(seq.logprobs)))
            _end(seq.eos, logits, rows)


def _choose_group(registry: Registry, logits: Tensor, group: list[tuple[int, list[int]]]) -> Tensor:
    """Choose the next token of a group of sequences with one :func:`~moesteer.decoding.chooser` and
    sampling, write it into their branch rows, and return :func:`~moesteer.decoding.next_tokens`'
    ``[S, 3]`` rows (on the device)."""
    first = registry.sequences[group[0][0]]
    strategy, sampling = chooser(first.strategy), first.sampling
    seqs = [registry.sequences[seq_id] for seq_id, _ in group]
    keys = [*(s.prompt_key for s in seqs), *(s.sample for s in seqs), *(s.offset + len(s.logprobs) for s in seqs)]
    rows_and_keys = torch.tensor([r for _, seq_rows in group for r in seq_rows] + keys, device=logits.device)
    rows, keys_t = rows_and_keys[: -3 * len(seqs)], rows_and_keys[-3 * len(seqs) :].view(3, len(seqs))
    branch_logprobs = torch.log_softmax(logits[rows].float(), dim=-1).view(len(group), len(first.branches), -1)
    passthrough = len(first.branches) == 1 and sampling.temperature == 0
    own = logits[rows].argmax(-1) if passthrough else None  # vLLM's greedy argmax, bit-identical to unsteered vLLM
    chosen = next_tokens(strategy, branch_logprobs, first.eos, sampling, keys_t, own)
    if not passthrough:
        per_row = chosen[:, 0].long().repeat_interleave(len(first.branches))
        logits[rows] = float("-inf")
        logits[rows, per_row] = 0.0
    return chosen


def _end(eos: tuple[int, ...], logits: Tensor, rows: list[int]) -> None:
    """Make ``rows`` emit EOS (token 0 for a model without one), so their requests finish."""
    logits[rows] = float("-inf")
    logits[rows, eos[0] if eos else 0] = 0.0
