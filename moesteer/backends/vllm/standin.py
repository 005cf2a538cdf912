"""Stand-ins for vLLM's V1 model runner and fused-MoE router, holding only what the router hook
reads, so that the hook (:mod:`.router_hook`) and the branch rule (:mod:`.step_tokens`) run on any
device without vLLM: the device tests and ``bench/gpu_check.py`` drive them with CUDA or ``meta``
tensors where no vLLM build for that device is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from moesteer.backends.vllm.registry import EXTRA_ARGS_KEY, Sequence, row_args
from moesteer.sampling import SamplingParams
from moesteer.strategy import TokenStrategy
from moesteer.trace import RoutingTrace


@dataclass
class StandInRouter:
    """vLLM's ``FusedTopKRouter`` rule: softmax scores, top-k, weights renormalised when asked."""

    top_k: int
    global_num_experts: int
    renormalize: bool
    scoring_func: str = "softmax"

    def _compute_routing(self, hidden_states: Tensor, router_logits: Tensor, indices_type=None, **kwargs):
        weights, ids = router_logits.float().softmax(-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, ids.to(torch.int32)


@dataclass(frozen=True)
class ScheduledRow:
    """One branch request in a step: its ``extra_args``, the tokens already computed for it, and
    the tokens the step feeds it."""

    extra_args: dict
    computed: int
    scheduled: int


def branch_rows(
    strategy: TokenStrategy,
    seq_id: int,
    prompt_len: int,
    *,
    computed: int,
    scheduled: int,
    sampling: SamplingParams | None = None,
    prompt_key: int = 0,
    sample: int = 0,
    eos: tuple[int, ...] = (0,),
    trace: bool = False,
) -> list[ScheduledRow]:
    """The rows of one sequence (one per branch of ``strategy``) as the engine submits them."""
    seq = Sequence(
        strategy,
        strategy.branches(),
        sampling or SamplingParams(),
        prompt_key,
        sample,
        prompt_len,
        trace=RoutingTrace() if trace else None,
    )
    rows = len(seq.branches)
    return [
        ScheduledRow({EXTRA_ARGS_KEY: row_args(seq, seq_id, b, seq_id, rows, eos)}, computed, scheduled)
        for b in range(rows)
    ]


def runner(rows: list[ScheduledRow]) -> SimpleNamespace:
    """A V1 runner's host-side view of a step that schedules ``rows`` (requests ``r0``, ``r1``, ...)."""
    ids = [f"r{i}" for i in range(len(rows))]
    starts = np.cumsum([0, *(row.scheduled for row in rows)])
    return SimpleNamespace(
        input_batch=SimpleNamespace(
            num_reqs=len(rows),
            req_ids=ids,
            num_computed_tokens_cpu=np.array([row.computed for row in rows], dtype=np.int32),
        ),
        query_start_loc=SimpleNamespace(cpu=torch.from_numpy(starts).to(torch.int32)),
        requests={
            i: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=r.extra_args))
            for i, r in zip(ids, rows, strict=True)
        },
    )
