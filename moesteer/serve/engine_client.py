"""The server's engine client: vLLM's ``AsyncLLM`` with a strategy per request.

:class:`MoesteerAsyncLLM` is what vLLM's OpenAI app calls. A request whose ``vllm_xargs`` name no
strategy goes to ``AsyncLLM.generate`` untouched. A steered request is checked before ``generate``
returns (so a bad one is a 400 even when streamed, before any event), then:

* a token strategy (a routing policy, SCMoE, RoE, ...) becomes, per sample, one vLLM request per
  branch: the rows ``VLLMEngine`` submits for the same sequence (row data, routing cache salts,
  one chunk), added as one gang the lock-step scheduler releases whole. Branch 0 carries the
  client's output kind (deltas when streaming) and is what the client reads; when a sample ends,
  all its rows are aborted in one call and its results collected (``moesteer_pop``): a sequence
  whose branches were split answers 503 (retry);
* a controller (self-consistency, best-of-n, beam search, DES, and with ``--allow gradients`` C3PO
  and rerouting) runs in one worker thread of this process through :class:`ServedEngine`, a
  ``VLLMEngine`` whose ``vllm.LLM`` calls are bridged onto this client, non-streamed.

If the client goes away, every row still running is aborted in one call and its sequences are
forgotten in the workers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer
from vllm import SamplingParams as VllmSamplingParams
from vllm.exceptions import RetryableRequestError, VLLMValidationError
from vllm.inputs.engine import tokens_input
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.utils.async_utils import merge_async_iterators
from vllm.v1.engine.async_llm import AsyncLLM

from moesteer.backends.base import eos_ids
from moesteer.backends.vllm.engine import VLLMEngine
from moesteer.backends.vllm.identity import SEQ_IDS, cache_salt
from moesteer.backends.vllm.launch import generation_config
from moesteer.backends.vllm.registry import EXTRA_ARGS_KEY, Sequence, row_args
from moesteer.cli.common import one_line
from moesteer.models.adapters import get_adapter
from moesteer.routing import Policy, RouterSite
from moesteer.sampling import Completion, SamplingParams
from moesteer.serve.requests import (
    STRATEGY_KEY,
    TRACE_KEY,
    ServeOptions,
    check_request,
    parts,
    request_strategy,
    sampling_of,
)
from moesteer.serve.traces import TraceStore, routed_experts
from moesteer.strategies.base import Controller, run
from moesteer.strategy import Strategy, TokenStrategy, as_strategy
from moesteer.trace import RoutingTrace
from moesteer.trace_file import TracedCompletion


@dataclass
class Row:
    """One vLLM request of a steered request: a branch of one sample's sequence."""

    request_id: str
    prompt: dict
    params: VllmSamplingParams


@dataclass
class Job:
    """A checked steered request: its strategy, sampling, prompt and (token strategies) rows."""

    strategy: Strategy
    sampling: SamplingParams
    prompt_ids: list[int]
    delta: bool
    traced: bool
    trace_start: int = 0  # prompt tokens left out of the routed experts returned
    seq_ids: list[int] = field(default_factory=list)
    rows: list[list[Row]] = field(default_factory=list)  # per sample, branch 0 first


class MoesteerAsyncLLM(AsyncLLM):
    """vLLM's async engine client, with moesteer's strategies per request (module docstring).
    Call :meth:`install` once before serving."""

    options: ServeOptions
    served: ServedEngine
    served_name: str
    traces: TraceStore
    _closing = False  # set by shutdown

    async def install(self, model: str, tokenizer: str | None, options: ServeOptions, served_name: str) -> None:
        """Install the router hook in every worker and build the checks' view of the model;
        ``served_name`` is what clients send as ``model`` (aliases add ``+ALIAS``)."""
        sites = VLLMEngine._agreed(await self.collective_rpc("moesteer_install"), "hooked routers")
        scheduler = self.vllm_config.scheduler_config
        self.options, self.served_name = options, served_name
        self.served = ServedEngine(
            _Bridge(self, asyncio.get_running_loop()),
            model,
            tokenizer,
            {int(fields[0]): RouterSite(*fields) for fields in sites},
            scheduler.max_num_seqs,
            scheduler.max_num_batched_tokens,
        )
        self.traces = TraceStore(served_name, self.served.routing_sizes()[0], self.served.moe_layers)
        self._controllers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moesteer-controller")

    def shutdown(self, timeout: float | None = None) -> None:
        self._closing = True  # requests still open end without asking the stopped engine anything
        controllers = getattr(self, "_controllers", None)
        if controllers is not None:
            controllers.shutdown(wait=False, cancel_futures=True)
        super().shutdown(timeout=timeout)

    # ---- the entry point vLLM's server calls ---------------------------------------------------

    def generate(self, prompt, sampling_params, request_id: str, **kwargs) -> AsyncGenerator[RequestOutput, None]:
        """``AsyncLLM.generate`` for unsteered requests; a steered one is checked now (a
        ``VLLMValidationError``, the server's 400) and served by the returned generator."""
        extra = sampling_params.extra_args if isinstance(sampling_params, VllmSamplingParams) else None
        if not extra or (STRATEGY_KEY not in extra and TRACE_KEY not in extra):
            return super().generate(prompt, sampling_params, request_id, **kwargs)
        try:
            if kwargs.get("lora_request") is not None:
                raise ValueError("a LoRA adapter is not steered; send the steered request to the base model")
            job = self._job(prompt, sampling_params)
        except ValueError as err:
            raise VLLMValidationError(one_line(str(err))) from None
        if isinstance(job.strategy, Controller):
            return self._controlled(job, request_id)
        return self._steered(job, request_id, kwargs)

    # ---- checking a request --------------------------------------------------------------------

    def _job(self, prompt, params: VllmSamplingParams) -> Job:
        extra = dict(params.extra_args)
        strategy = request_strategy(extra.pop(STRATEGY_KEY, "plain"), self.options)
        traced = bool(extra.pop(TRACE_KEY, 0))
        if extra:
            raise ValueError(f"unknown vllm_xargs {sorted(extra)!r} beside {STRATEGY_KEY!r}; moesteer reads only those")
        delta = params.output_kind == RequestOutputKind.DELTA
        check_request(strategy, params, stream=delta)
        if traced and (delta or isinstance(strategy, Controller)):
            raise ValueError(f"{TRACE_KEY} is returned with a whole completion of a token strategy; drop stream")
        prompt_ids, client_salt = _prompt_of(prompt, self.served)
        job = Job(strategy, sampling_of(params), prompt_ids, delta, traced, params.routed_experts_prompt_start)
        for part in parts(strategy):  # a controller's inner strategies and policies too
            if isinstance(part, TokenStrategy | Policy):
                self.served.check_strategy(as_strategy(part))
        if isinstance(strategy, TokenStrategy):
            self._rows(job, params, client_salt)
        return job

    def _rows(self, job: Job, params: VllmSamplingParams, client_salt: str | None) -> None:
        """Per sample, one request per branch, as ``VLLMEngine`` submits them (one chunk a sample)."""
        strategy, sampling, ids = job.strategy, job.sampling, job.prompt_ids
        eos = tuple(sorted(self.served.eos_ids))
        for sample in range(sampling.n):
            trace = RoutingTrace() if job.traced else None
            seq = Sequence(strategy, strategy.branches(), sampling, 0, sample, len(ids), trace=trace)
            list(self.served._chunks([seq], [ids]))  # the step budget: a one-line ValueError when over it
            seq_id = next(SEQ_IDS)
            rows = []
            for branch, policy in enumerate(seq.branches):
                salt = cache_salt(policy, sampling.seed, seq, branch, seq_id, client=client_salt)
                row_params = VllmSamplingParams(
                    temperature=0.0,  # the combiner chooses; vLLM's greedy sampler follows
                    max_tokens=sampling.max_tokens,
                    stop=list(sampling.stop) or None,
                    stop_token_ids=params.stop_token_ids,
                    ignore_eos=sampling.ignore_eos,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    logprobs=params.logprobs if branch == 0 else None,
                    output_kind=params.output_kind if branch == 0 else RequestOutputKind.FINAL_ONLY,
                    extra_args={EXTRA_ARGS_KEY: row_args(seq, seq_id, branch, seq_id, len(seq.branches), eos)},
                )
                rows.append(Row(f"moesteer-{seq_id}-{branch}", tokens_input(ids, cache_salt=salt), row_params))
            job.seq_ids.append(seq_id)
            job.rows.append(rows)

    # ---- token strategies ----------------------------------------------------------------------

    async def _steered(self, job: Job, request_id: str, kwargs: dict) -> AsyncGenerator[RequestOutput, None]:
        extra = {k: kwargs[k] for k in ("trace_headers", "priority") if k in kwargs}
        queues: dict[int, list] = {}
        finished: set[int] = set()
        try:
            for sample, rows in enumerate(job.rows):  # a gang: the scheduler holds it until all rows arrive
                queues[sample] = []
                for row in rows:
                    queues[sample].append(await self.add_request(row.request_id, row.prompt, row.params, **extra))
            merged = merge_async_iterators(*(_outputs(queues[s][0]) for s in range(len(job.rows))))
            final: dict[int, RequestOutput] = {}
            async for sample, out in merged:
                (output,) = out.outputs
                output.index = sample
                out.request_id = request_id
                if out.finished:
                    await self._finish(job, sample, queues[sample], output, request_id)
                    finished.add(sample)
                    final[sample] = out
                out.finished = len(finished) == len(job.rows)
                if job.delta:
                    yield out
            if not job.delta:
                first = final[0]
                first.outputs = [final[s].outputs[0] for s in sorted(final)]
                yield first
        finally:
            running = [s for s in queues if s not in finished]
            for per_sample in queues.values():
                for queue in per_sample:
                    queue.close()
            if running and not self._closing:  # one abort for every row, then forget them
                with suppress(Exception):
                    await self.abort([q.request_id for s in running for q in queues[s]], internal=True)
                    await self.collective_rpc("moesteer_pop", args=([job.seq_ids[s] for s in running],))

    async def _finish(self, job: Job, sample: int, queues: list, output: CompletionOutput, request_id: str) -> None:
        """A sample's branch 0 ended: end its other rows, collect its results (an error is a 503)
        and its trace (kept for the trace endpoint)."""
        await self.abort([q.request_id for q in queues], internal=True)
        (result,) = VLLMEngine._agreed(
            await self.collective_rpc("moesteer_pop", args=([job.seq_ids[sample]],)), "decoded tokens"
        )
        if result["error"] is not None:
            raise RetryableRequestError(f"{result['error']['message']}; retry the request")
        if job.traced and result["trace"] is not None:
            trace = RoutingTrace.from_data(result["trace"])
            experts = routed_experts(trace, len(job.prompt_ids), len(output.token_ids))
            output.routed_experts = experts[min(job.trace_start, len(job.prompt_ids)) :]
            self.traces.add(request_id, job.strategy.spec(), TracedCompletion(0, sample, output.text, trace))

    # ---- controllers ---------------------------------------------------------------------------

    async def _controlled(self, job: Job, request_id: str) -> AsyncGenerator[RequestOutput, None]:
        loop = asyncio.get_running_loop()
        completions = await loop.run_in_executor(
            self._controllers,
            lambda: run(job.strategy, self.served, [job.prompt_ids], job.sampling, prompt_keys=[0]),
        )
        outputs = [_completion_output(i, c) for i, c in enumerate(completions)]
        yield RequestOutput(request_id, None, job.prompt_ids, None, outputs, True)

    async def generate_rows(self, prompts: list[dict], params: list[VllmSamplingParams]) -> list[RequestOutput]:
        """``vllm.LLM.generate`` for :class:`ServedEngine`: the final output of each request, in order."""

        async def one(i: int) -> RequestOutput:
            last = None
            async for out in AsyncLLM.generate(self, prompts[i], params[i], f"moesteer-ctl-{uuid.uuid4().hex}"):
                last = out
            return last

        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


async def _outputs(queue) -> AsyncGenerator[RequestOutput, None]:
    """A request's outputs from its collector until it finishes."""
    while True:
        out = queue.get_nowait() or await queue.get()
        yield out
        if out.finished:
            return


def _prompt_of(prompt, served: ServedEngine) -> tuple[list[int], str | None]:
    """The token ids and client cache salt of a rendered prompt (or a text / token-id prompt)."""
    if isinstance(prompt, str):
        return served.encode(prompt), None
    if isinstance(prompt, dict) and prompt.get("type", "token") == "token" and "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"]), prompt.get("cache_salt")
    raise ValueError("steering serves text and token prompts only")


def _completion_output(index: int, completion: Completion) -> CompletionOutput:
    return CompletionOutput(
        index=index,
        text=completion.text,
        token_ids=list(completion.token_ids),
        cumulative_logprob=None,
        logprobs=None,
        finish_reason=completion.finish_reason,
    )


class _Bridge:
    """The two ``vllm.LLM`` calls ``VLLMEngine`` makes, run on the server's event loop from a
    worker thread (they block the thread, never the loop)."""

    def __init__(self, client: MoesteerAsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop

    def generate(self, prompts: list, params: list, use_tqdm: bool = False) -> list[RequestOutput]:
        rendered = [tokens_input(p["prompt_token_ids"], cache_salt=p.get("cache_salt")) for p in prompts]
        return self._call(self.client.generate_rows(rendered, list(params)))

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        return self._call(self.client.collective_rpc(method, args=tuple(args)))

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


class ServedEngine(VLLMEngine):
    """A ``VLLMEngine`` over the server's engine client instead of its own ``vllm.LLM``: the
    strategy checks, step budget and prompt encoding of the server, and the engine controllers
    drive (from a worker thread only: its vLLM calls block until the event loop answers)."""

    def __init__(
        self,
        llm: _Bridge,
        model: str,
        tokenizer: str | None,
        sites: dict[int, RouterSite],
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.llm, self.name, self._hf_copy = llm, model, None
        self.config = AutoConfig.from_pretrained(model)
        self.adapter = get_adapter(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.eos_ids = eos_ids(generation_config(model), self.tokenizer)
        self.sites, self.moe_layers = sites, tuple(sites)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.dtype = str(llm.client.model_config.dtype).removeprefix("torch.")
        self.gradient_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gradient_dtype = None
