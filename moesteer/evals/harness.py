"""lm-evaluation-harness bridge: run any lm-eval task through the steered engine.

Registers ``moesteer`` as an lm-eval model (``pip install 'moesteer[lm-eval]'``)::

    moesteer lm-eval --model moesteer --model_args "pretrained=PATH,strategy=scmoe(beta=0.5, alpha=0.1)" \\
        --tasks gsm8k --include_path my_tasks/

``generate_until`` decodes with the strategy; ``loglikelihood`` scores continuations under the
strategy's combined distribution (``is_greedy``: every continuation token is the argmax). Model
arguments split on commas outside parentheses, so strategy specs may carry several parameters.
Each finished generation is handed to lm-eval's cache hook, so ``--use_cache`` resumes.
``backend=vllm`` in the model arguments serves the model with vLLM (log-likelihoods for one-branch
strategies only, see docs/vllm.md).
"""

from __future__ import annotations

import inspect

from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model

from moesteer.checks import did_you_mean, parse_kv, split_top_level
from moesteer.lm import load
from moesteer.sampling import SamplingParams, check_seed
from moesteer.strategies.spec import parse
from moesteer.strategy import TokenStrategy


def split_model_args(text: str) -> dict[str, str]:
    """``"a=1,strategy=scmoe(beta=0.5, alpha=0.1)"`` -> ``{"a": "1", "strategy": "scmoe(...)"}``."""
    return parse_kv(split_top_level(text), "model argument", "pretrained=PATH")


def check_model_args(args: dict[str, str]) -> None:
    """``ValueError`` for an unknown model argument ("did you mean": a typo must not run plain
    decoding) or a bad strategy spec, before any model loads."""
    known = [name for name in inspect.signature(MoesteerHarnessLM.__init__).parameters if name != "self"]
    for key in args:
        if key not in known:
            hint = did_you_mean(key, known)
            raise ValueError(f"unknown moesteer model argument {key!r}{hint}; known: {', '.join(known)}")
    parse(args.get("strategy", "plain()"))


@register_model("moesteer")
class MoesteerHarnessLM(HarnessLM):
    """A moesteer model under a steering strategy, as an lm-eval model."""

    def __init__(
        self,
        pretrained: str | None = None,
        strategy: str = "plain()",
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 16,
        seed: int = 0,
        backend: str = "hf",
    ) -> None:
        super().__init__()
        self.strategy = parse(strategy)  # a bad spec fails before the model loads
        if backend == "hf":
            self.lm = load(pretrained, dtype=dtype, device=device)
        else:  # vLLM places the model itself
            self.lm = load(pretrained, dtype=dtype, backend=backend)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        check_seed(self.seed)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls._create(split_model_args(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        return cls._create(dict(arg_dict), additional_config)

    @classmethod
    def _create(cls, args: dict, additional_config: dict | None):
        """lm-eval adds ``batch_size`` and ``device`` (default cuda): honour a device only where it exists."""
        import torch

        check_model_args(args)
        config = additional_config or {}
        extra = {"batch_size": config["batch_size"]} if config.get("batch_size") not in (None, "auto") else {}
        device = config.get("device")
        if device and (str(device).startswith("cpu") or torch.cuda.is_available()):
            extra["device"] = device
        return cls(**{**extra, **args})

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str] = []
        for request in requests:  # one at a time: every request may carry its own gen_kwargs
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until", [])
            sampling = SamplingParams(
                temperature=float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0,
                max_tokens=int(gen_kwargs.get("max_gen_toks", 256)),
                stop=(until,) if isinstance(until, str) else tuple(until),
                seed=self.seed,
            )
            text = self.lm.generate([context], self.strategy, sampling)[0].text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not isinstance(self.strategy, TokenStrategy):
            raise ValueError(f"{self.strategy} has no per-token distribution; loglikelihood needs a token strategy")
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            contexts = [r.args[0] for r in chunk]
            continuations = [r.args[1] for r in chunk]
            scored = self.lm.engine.score(contexts, continuations, self.strategy, with_greedy=True)
            for request, (logprobs, greedy) in zip(chunk, scored, strict=True):
                result = (float(logprobs.sum()), bool(greedy))
                self.cache_hook.add_partial("loglikelihood", request.args, result)
                results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            ids = self.lm.engine.encode(request.args[0])
            logprobs, _ = self.lm.engine.score([ids[:1]], [ids[1:]], self.strategy, with_greedy=True)[0]
            results.append(float(logprobs.sum()))
        return results
