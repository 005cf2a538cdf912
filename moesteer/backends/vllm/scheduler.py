"""A vLLM scheduler that admits each submitted chunk of requests whole: branch lock-step by design.

The branches of a sequence must be scheduled in the same steps (the combiner picks one token for
all of them). Requests can arrive one message at a time (an engine core in its own process, a
server) and the core steps as soon as the first is there, and under load vLLM admits waiting
requests only while rows, the step's token budget and KV blocks last, chunking a prefill that does
not fit: either would split a sequence's branches across steps. :class:`LockstepScheduler`
therefore holds every moesteer request until all ``rows`` requests of its chunk
(``extra_args["moesteer"]["chunk"]``) have arrived, and releases a complete chunk, oldest first,
only when nothing waits before it and its rows, whole prompts and KV blocks fit the coming step
(or when nothing else runs, so a chunk too large for any step still fails loudly instead of
waiting forever). Complete chunks that wait count as unfinished work, so the engine keeps
stepping. Other requests, and requests whose moesteer entry is malformed, pass straight through;
an aborted request is dropped from the hold.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm.v1.core.sched.scheduler import Scheduler

from moesteer.backends.vllm.registry import row_data

SCHEDULER = "moesteer.backends.vllm.scheduler.LockstepScheduler"


class LockstepScheduler(Scheduler):
    """vLLM's scheduler, admitting each moesteer chunk whole (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[int, list] = {}  # chunk id -> its requests that have arrived
        self.complete: list[list] = []  # whole chunks waiting for room, oldest first

    def add_request(self, request) -> None:
        params = request.sampling_params
        args = row_data(params.extra_args if params is not None else None)
        if args is None:
            super().add_request(request)
            return
        arrived = self.held.setdefault(args["chunk"], [])
        arrived.append(request)
        if len(arrived) == args["rows"]:
            self.complete.append(self.held.pop(args["chunk"]))

    def schedule(self, *args, **kwargs):
        while self.complete and self._fits(self.complete[0]):
            for request in self.complete.pop(0):
                super().add_request(request)
        return super().schedule(*args, **kwargs)

    def _fits(self, chunk: list) -> bool:
        """Whether ``chunk`` is admitted whole by the coming step: nothing waits before it, and its
        rows, prompt tokens (beside one decode token per running request) and KV blocks fit."""
        if not self.running and not self.waiting:
            return True
        blocks = sum(-(-(r.num_prompt_tokens + 1) // self.block_size) for r in chunk)
        return (
            not self.waiting
            and len(self.running) + len(chunk) <= self.max_num_running_reqs
            and len(self.running) + sum(r.num_prompt_tokens for r in chunk) <= self.max_num_scheduled_tokens
            and blocks <= self.kv_cache_manager.block_pool.get_num_free_blocks()
        )

    def get_num_unfinished_requests(self) -> int:
        return super().get_num_unfinished_requests() + sum(len(chunk) for chunk in self.complete)

    def has_requests(self) -> bool:
        return bool(self.complete) or super().has_requests()

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status):
        if request_ids is None:
            self.held.clear()
            self.complete.clear()
        else:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            for chunk, requests in list(self.held.items()):
                requests[:] = [r for r in requests if r.request_id not in ids]
                if not requests:
                    del self.held[chunk]
            for requests in self.complete:
                requests[:] = [r for r in requests if r.request_id not in ids]
            self.complete = [requests for requests in self.complete if requests]
        return super().finish_requests(request_ids, finished_status)
