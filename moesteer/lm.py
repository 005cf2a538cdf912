"""``moesteer.load``: a supported MoE model and its tokenizer, by hub id, local path, or as given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from moesteer.models.adapters import FamilyAdapter, find_routers, get_adapter


@dataclass
class LM:
    """A loaded MoE language model: the HF model, its tokenizer and its family adapter."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    adapter: FamilyAdapter
    name: str
    _engine: object = field(default=None, repr=False)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(find_routers(self.model, self.adapter))

    @property
    def engine(self):
        """The backend engine (HF: :class:`moesteer.backends.hf.HFEngine`)."""
        if self._engine is None:
            from moesteer.backends.hf import HFEngine

            self._engine = HFEngine(self)
        return self._engine

    def generate(
        self, prompts, strategy=None, sampling=None, *, chat: bool = False, trace: bool = False, **sampling_kwargs
    ):
        """Completions of ``prompts`` under ``strategy`` (a Strategy, a routing policy or None).

        Sampling settings come as a ``SamplingParams`` or as its keyword arguments
        (``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``stop``, ``seed``, ``n``).

        Example:
            >>> lm.generate(["Q: 3 + 4 = ?\\n"], strategy=TopK(1), max_tokens=32)
        """
        from moesteer.sampling import SamplingParams

        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling is not None and sampling_kwargs:
            raise ValueError("pass either sampling=SamplingParams(...) or sampling keywords, not both")
        sampling = sampling or SamplingParams(**sampling_kwargs)
        return self.engine.generate(prompts, strategy, sampling, chat=chat, trace=trace)

    def score(self, prompts, continuations, strategy=None):
        """Per-token log-probs of ``continuations`` given ``prompts`` under ``strategy``."""
        return self.engine.score(prompts, continuations, strategy)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _default_model() -> str:
    from moesteer.assets import default_model_path

    return default_model_path()


def load(
    model: str | Path | PreTrainedModel | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
) -> LM:
    """Load a model by hub id or local path (``None``: the embedded tiny MoE), or wrap a loaded one.

    An unsupported or dense model raises a one-line ``ValueError`` listing the supported families;
    a model that cannot be found (e.g. offline) raises ``OSError`` naming it.
    """
    if isinstance(model, PreTrainedModel):
        get_adapter(model.config)
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        return LM(model, tokenizer, get_adapter(model.config), getattr(model.config, "_name_or_path", "") or "model")
    name = str(model) if model is not None else _default_model()
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        reason = type(err).__name__
        raise OSError(
            f"cannot load model {name!r}: no such local directory and not reachable on the hub ({reason})"
        ) from None
    adapter = get_adapter(config)
    kwargs = {"dtype": parse_dtype(dtype) or torch.float32}
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
