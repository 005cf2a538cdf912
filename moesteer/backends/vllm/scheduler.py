"""A vLLM scheduler that admits each submitted chunk of requests whole: branch lock-step by design.

The branches of a sequence must be scheduled in the same steps (the combiner picks one token for
all of them). With the engine core in this process, ``LLM.generate`` adds every request before the
first step, so a chunk that fits one step is admitted together. With the engine core in its own
process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) requests arrive one message at a time and the core
steps as soon as the first is there, which would split a sequence's branches across steps.
:class:`LockstepScheduler` holds back every moesteer request until all ``rows`` requests of its
chunk (``extra_args["moesteer"]["chunk"]``) have arrived, then admits them in one go; other
requests pass straight through. A held request that is aborted is dropped from the hold.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm.v1.core.sched.scheduler import Scheduler

from moesteer.backends.vllm.registry import EXTRA_ARGS_KEY

SCHEDULER = "moesteer.backends.vllm.scheduler.LockstepScheduler"


class LockstepScheduler(Scheduler):
    """vLLM's scheduler, admitting each moesteer chunk whole (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[int, list] = {}  # chunk id -> its requests that have arrived

    def add_request(self, request) -> None:
        params = request.sampling_params
        args = ((params.extra_args if params is not None else None) or {}).get(EXTRA_ARGS_KEY)
        if args is None:
            super().add_request(request)
            return
        arrived = self.held.setdefault(int(args["chunk"]), [])
        arrived.append(request)
        if len(arrived) == int(args["rows"]):
            for held in self.held.pop(int(args["chunk"])):
                super().add_request(held)

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status):
        if request_ids is None:
            self.held.clear()
        else:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            for chunk, requests in list(self.held.items()):
                requests[:] = [r for r in requests if r.request_id not in ids]
                if not requests:
                    del self.held[chunk]
        return super().finish_requests(request_ids, finished_status)
