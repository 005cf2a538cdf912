"""The branch combiner: a vLLM v1 logits processor that makes the branches of a sequence one decoder.

Each step, for every sequence whose branch rows all sample now, it computes the shared next-token
rule (:mod:`moesteer.decoding`: ``combine`` over the branches' log-probs, EOS ban, greedy or
Gumbel-max sampling keyed like the HF engine) and writes a one-hot row (0 at the chosen token,
−inf elsewhere) into **every** branch row, so vLLM's greedy sampler appends the same token to all
of them while each keeps its own KV cache and routing. Requests run at temperature 0 inside vLLM.

Single-branch greedy sequences are left untouched (vLLM's own argmax picks the token), so plain
and routed greedy decoding are exactly vLLM's. Branches of one sequence that are not all scheduled
in the same step (chunked prefill, preemption) raise ``RuntimeError``: there is no silent fallback.
Non-finite scores (:class:`~moesteer.decoding.NonFiniteScores`) are not raised inside vLLM's
step, which would kill its engine: the sequence keeps the error and is ended (EOS), and the
engine raises it when the call returns.

:class:`BranchCombiner` is a module-level class, given to vLLM by its qualified name
(:data:`COMBINER`), so every worker process builds its own from the same code; it reads the
sequences of its process's :data:`~moesteer.backends.vllm.registry.REGISTRY`. Each tensor-parallel
rank combines its own all-gathered logits with the same deterministic rule, so all ranks append the
same token.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from moesteer.backends.vllm.registry import REGISTRY, Registry
from moesteer.decoding import NonFiniteScores, choose, next_token_scores
from moesteer.trace import RowId

Row = tuple[RowId, list[int]]  # (row key, the request's live output token list)
COMBINER = "moesteer.backends.vllm.combiner:BranchCombiner"


def combine_rows(registry: Registry, logits: Tensor, rows: dict[int, Row]) -> None:
    """Choose the next token of every ready sequence and write it into its branch rows, in place."""
    by_sequence: dict[int, dict[int, tuple[int, list[int]]]] = defaultdict(dict)
    for row, ((seq_id, branch), output) in rows.items():
        if seq_id in registry.sequences:
            by_sequence[seq_id][branch] = (row, output)
    if not by_sequence:
        return
    ready: dict[tuple[int, int], list[tuple[int, list[int]]]] = defaultdict(list)  # (strategy, sampling) -> seqs
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
        if not all(samples_now) or len(branches) != len(seq.branches):
            raise RuntimeError(
                f"moesteer: only {sum(samples_now)} of the {len(seq.branches)} branches of sequence {seq_id} were "
                "scheduled in this step; raise max_num_seqs / max_num_batched_tokens or lower the batch"
            )
        rows_of_seq = [branches[b][0] for b in range(len(seq.branches))]
        ready[(id(seq.strategy), id(seq.sampling))].append((seq_id, rows_of_seq))
    for group in ready.values():
        _choose_group(registry, logits, group)


def _choose_group(registry: Registry, logits: Tensor, group: list[tuple[int, list[int]]]) -> None:
    first = registry.sequences[group[0][0]]
    strategy, sampling = first.strategy, first.sampling
    rows = torch.tensor([r for _, seq_rows in group for r in seq_rows], device=logits.device)
    branch_logprobs = torch.log_softmax(logits[rows].float(), dim=-1).view(len(group), len(first.branches), -1)
    seqs = [registry.sequences[seq_id] for seq_id, _ in group]
    step = torch.tensor([s.offset + len(s.logprobs) for s in seqs])  # generated-token index
    try:
        scores = next_token_scores(strategy, branch_logprobs, first.eos, step)
    except NonFiniteScores as err:
        for seq in seqs:
            seq.error = str(err)
        _end(first.eos, logits, rows.tolist())
        return
    passthrough = len(first.branches) == 1 and sampling.temperature == 0
    if passthrough:  # vLLM's own greedy argmax picks, bit-identical to unsteered vLLM
        tokens = logits[rows].argmax(-1)
    else:
        prompt = torch.tensor([s.prompt_key for s in seqs])
        sample = torch.tensor([s.sample for s in seqs])
        tokens = choose(scores, sampling, prompt, sample, step)
    for s, seq in enumerate(seqs):
        seq.logprobs.append(float(scores[s, tokens[s]]))
    if not passthrough:
        per_row = tokens.to(logits.device).repeat_interleave(len(first.branches))
        logits[rows] = float("-inf")
        logits[rows, per_row] = 0.0


def _end(eos: tuple[int, ...], logits: Tensor, rows: list[int]) -> None:
    """Make ``rows`` emit EOS (token 0 for a model without one), so their requests finish."""
    logits[rows] = float("-inf")
    logits[rows, eos[0] if eos else 0] = 0.0


class BranchCombiner(LogitsProcessor):
    """The vLLM logits processor (module docstring); vLLM builds one per worker."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.rows: dict[int, Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params, _prompt, output):
            found = REGISTRY.lookup(params.extra_args)
            return None if found is None else (found[0], output)

        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: Tensor) -> Tensor:
        if self.rows:
            combine_rows(REGISTRY, logits, self.rows)
        return logits
