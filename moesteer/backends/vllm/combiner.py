"""The branch combiner: a vLLM v1 logits processor that makes the branches of a sequence one decoder.

Each step, for every sequence whose branch rows all sample now, it computes the shared next-token
rule (:mod:`.step_tokens`, :mod:`moesteer.decoding`: ``combine`` over the branches' log-probs, EOS
ban, greedy or Gumbel-max sampling keyed like the HF engine) and writes a one-hot row (0 at the chosen token,
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

from torch import Tensor
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from moesteer.backends.vllm.registry import EXTRA_ARGS_KEY, REGISTRY, check_row_data
from moesteer.backends.vllm.step_tokens import Row, combine_rows

COMBINER = "moesteer.backends.vllm.combiner:BranchCombiner"


class BranchCombiner(LogitsProcessor):
    """The vLLM logits processor (module docstring); vLLM builds one per worker."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.rows: dict[int, Row] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """In vLLM's front end, before a request reaches the engine core: an
        ``extra_args["moesteer"]`` that is not moesteer's row data is refused (a 400 from vLLM's
        server), so nothing a client sends reaches code that could raise inside the engine."""
        value = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if value is not None:
            check_row_data(value)

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
