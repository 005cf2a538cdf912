"""``moesteer.load``: a supported MoE model and its tokenizer, by hub id, local path, or as given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from moesteer.backends.base import Engine
from moesteer.backends.hf import HFEngine
from moesteer.dtypes import dtype_name, parse_dtype, resolve_dtype
from moesteer.models.adapters import FamilyAdapter, get_adapter
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import run
from moesteer.strategies.context import RunContext
from moesteer.strategy import Strategy


@dataclass
class LM:
    """A loaded MoE language model: its tokenizer, family adapter and engine, and the HF model
    (``None`` under the vLLM backend, which holds the weights itself)."""

    model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase | None
    adapter: FamilyAdapter
    name: str
    _engine: object = field(default=None, repr=False)

    @property
    def backend(self) -> str:
        return "hf" if self.model is not None else "vllm"

    @property
    def config(self):
        return self.model.config if self.model is not None else self._engine.config

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(self.engine.moe_layers)

    @property
    def engine(self) -> Engine:
        """The backend engine: :class:`moesteer.backends.hf.HFEngine` or
        :class:`moesteer.backends.vllm.VLLMEngine`."""
        if self._engine is None:
            self._engine = HFEngine(self.model, self.tokenizer, self.adapter, self.name)
        return self._engine

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        strategy: Strategy | Policy | Sequence[Strategy | Policy | None] | None = None,
        sampling: SamplingParams | None = None,
        *,
        chat: bool = False,
        trace: bool = False,
        prompt_keys: Sequence[int] | None = None,
        context: RunContext | None = None,
        **sampling_kwargs,
    ) -> list[Completion]:
        """Completions of ``prompts`` under ``strategy`` (a strategy, a routing policy or None, or one
        token strategy or policy per prompt), through :func:`moesteer.strategies.run`.

        Sampling settings come as a ``SamplingParams`` or as its keyword arguments
        (``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``stop``, ``seed``, ``n``).
        ``prompt_keys`` key each prompt's randomness (default: its index in ``prompts``);
        ``context`` reaches controllers (e.g. the task's answer extractor).

        Example:
            >>> lm.generate(["Q: 3 + 4 = ?\\n"], strategy=TopK(1), max_tokens=32)
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling is not None and sampling_kwargs:
            raise ValueError("pass either sampling=SamplingParams(...) or sampling keywords, not both")
        sampling = sampling or SamplingParams(**sampling_kwargs)
        return run(
            strategy, self.engine, prompts, sampling, chat=chat, trace=trace, prompt_keys=prompt_keys, context=context
        )

    def score(self, prompts, continuations, strategy=None):
        """Per-token log-probs of ``continuations`` given ``prompts`` under ``strategy``."""
        return self.engine.score(prompts, continuations, strategy)


BACKENDS = ("hf", "vllm")


def _load_vllm(model, dtype, tokenizer, engine_kwargs) -> LM:
    from moesteer.backends.vllm import VLLMEngine

    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ValueError("the vLLM backend takes a tokenizer path, not a tokenizer object")
    name = check_loadable(model)
    parsed = parse_dtype(dtype)
    engine = VLLMEngine(
        name,
        dtype=dtype_name(parsed) if isinstance(parsed, torch.dtype) else "auto",
        tokenizer=tokenizer,
        **engine_kwargs,
    )
    return LM(None, engine.tokenizer, engine.adapter, name, engine)


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch device that exists here; a one-line ``ValueError`` otherwise."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a torch device; expected e.g. cpu, cuda or cuda:0") from None
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError):
        cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        mps = ["mps"] if torch.backends.mps.is_available() else []
        available = ", ".join(["cpu", *cuda, *mps])
        raise ValueError(f"device {str(device)!r} is not available here; available: {available}") from None
    return parsed


def check_loadable(model: str | None) -> str:
    """The model's name (``None``: the embedded model's path), once its config names a supported
    family and its local weight files are whole; ``OSError`` / ``ValueError`` in one line otherwise."""
    name = _resolve(None if model is None else str(model))
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        reason = type(err).__name__
        raise OSError(
            f"cannot load model {name!r}: no such local directory and not reachable on the hub ({reason})"
        ) from None
    get_adapter(config)
    for weights in sorted(Path(name).glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):
                pass
        except SafetensorError as err:
            raise OSError(f"cannot load model {name!r}: {weights.name} is corrupt or truncated ({err})") from None
    return name


def _resolve(model: str | None) -> str:
    from moesteer.assets import resolve_model

    return resolve_model(model)


def load(
    model: str | Path | PreTrainedModel | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    backend: str = "hf",
    **engine_kwargs,
) -> LM:
    """Load a model by hub id or local path (``None``: the embedded tiny MoE), or wrap a loaded one.

    ``backend="vllm"`` serves it with vLLM (:class:`moesteer.backends.vllm.VLLMEngine`, which takes
    ``engine_kwargs``) instead of transformers. An unsupported or dense model raises a one-line
    ``ValueError`` listing the supported families; a model that cannot be found (e.g. offline)
    raises ``OSError`` naming it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        if isinstance(model, PreTrainedModel):
            raise ValueError("the vLLM backend loads weights itself: pass a hub id or a local path, not a model")
        return _load_vllm(model, dtype, tokenizer, engine_kwargs)
    if engine_kwargs:
        raise TypeError(f"unexpected arguments for backend hf: {', '.join(engine_kwargs)}")
    if isinstance(model, PreTrainedModel):
        get_adapter(model.config)
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        return LM(model, tokenizer, get_adapter(model.config), getattr(model.config, "_name_or_path", "") or "model")
    device = parse_device(device)
    name = check_loadable(model)
    config = AutoConfig.from_pretrained(name)
    adapter = get_adapter(config)
    on_gpu = device.type == "cuda" if device is not None else device_map is not None and torch.cuda.is_available()
    kwargs = {"dtype": resolve_dtype(dtype, config, gpu=on_gpu)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    if device is not None and device_map is None:
        hf_model = hf_model.to(device)
    tok = (
        tokenizer
        if isinstance(tokenizer, PreTrainedTokenizerBase)
        else AutoTokenizer.from_pretrained(tokenizer or name)
    )
    return LM(hf_model, tok, adapter, name)
