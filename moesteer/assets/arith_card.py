"""Evaluation and model card of the ``arith`` recipe's model (``tiny-arith-moe``).

Measured on the saved files as a user loads them: greedy accuracy on the test and validation
problems (and on test by operator count), and per-layer expert load over the test gold sequences
(see :mod:`moesteer.assets.measure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeForCausalLM, PreTrainedTokenizerFast

from moesteer.assets.measure import greedy_completions, load_stats, routing_counts
from moesteer.evals.tasks import arith

TASK = arith.ArithConfig()  # task B: 2-4 steps, operands 0-99, +/- and `* d` with p=0.25
MAX_NEW_TOKENS = 128


def greedy_accuracy(
    model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict[str, str]]
) -> list[bool]:
    """Greedy decode each ``arith`` prompt and score it against the gold answer."""
    texts = greedy_completions(model, tokenizer, [p["prompt"] for p in problems], MAX_NEW_TOKENS)
    return [arith.score(t, p["answer"]) for t, p in zip(texts, problems, strict=True)]


def expert_load(
    model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict[str, str]]
) -> list[dict[str, float]]:
    """Per layer: load entropy, largest share, dead experts over the gold sequences' tokens
    (prompt, chain of thought, answer); see :mod:`moesteer.assets.measure`."""
    texts = [p["prompt"] + p["target"] + tokenizer.eos_token for p in problems]
    top_k, _ = routing_counts(model, tokenizer, texts, [0] * len(texts), 1)
    return load_stats(top_k)


def accuracy_by_steps(problems: Sequence[dict[str, str]], correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy per number of operators (CoT lines before the answer)."""
    groups: dict[str, list[bool]] = {}
    for p, ok in zip(problems, correct, strict=True):
        groups.setdefault(str(p["target"].count("\n\n")), []).append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}


def evaluate(out: Path, eval_problems: int | None = None) -> dict:
    """Greedy accuracy (test, validation, by operator count) and expert load of the saved model."""
    shipped = AutoModelForCausalLM.from_pretrained(out).eval()
    shipped_tokenizer = AutoTokenizer.from_pretrained(out)
    splits = {s: arith.load_split(s, TASK)[:eval_problems] for s in ("test", "validation")}
    correct = {s: greedy_accuracy(shipped, shipped_tokenizer, p) for s, p in splits.items()}
    return {
        "test_accuracy": sum(correct["test"]) / len(correct["test"]),
        "test_problems": len(correct["test"]),
        "validation_accuracy": sum(correct["validation"]) / len(correct["validation"]),
        "validation_problems": len(correct["validation"]),
        "test_accuracy_by_steps": accuracy_by_steps(splits["test"], correct["test"]),
        "expert_load": expert_load(shipped, shipped_tokenizer, splits["test"]),
        "eval_dtype": str(shipped.dtype).removeprefix("torch."),
    }


def write_card(out: Path, log: dict) -> None:
    """Model card (``README.md``) with the configuration, data and measured metrics."""
    spec, cfg, m = log["model"], log["train"], log["metrics"]
    layers = "\n".join(
        f"| {i} | {r['load_entropy']:.3f} | {r['max_share']:.3f} |" for i, r in enumerate(m["expert_load"])
    )
    by_steps = ", ".join(f"{k} steps {v:.3f}" for k, v in m["test_accuracy_by_steps"].items())
    card = f"""---
license: apache-2.0
library_name: transformers
tags: [olmoe, mixture-of-experts, arithmetic, chain-of-thought, moesteer]
---

# tiny-arith-moe

The embedded default model of `moesteer`: a {log["params_total"] / 1e6:.2f}M-parameter
Mixture-of-Experts language model ({log["params_active"] / 1e6:.2f}M active per token) with the
OLMoE architecture (`OlmoeForCausalLM`), trained from scratch on CPU on synthetic multi-step
integer arithmetic with chain-of-thought. It exists so that routing-steering methods show real
effects on a machine without a model hub; it is not useful for anything else.

## Architecture

hidden {spec["hidden"]}, {spec["layers"]} layers, {spec["heads"]} attention heads,
{spec["experts"]} experts per layer, top-{spec["top_k"]} routing (softmax, `norm_topk_prob=False`),
expert intermediate size {spec["intermediate"]}, vocabulary {spec["vocab"]} (character-level,
{log["tokenizer_size"]} tokens used), untied embeddings. Weights are stored in bfloat16
(`model.safetensors`); the config's dtype is float32, so `from_pretrained` upcasts them exactly
and computes in float32 (pass `dtype=torch.bfloat16` to compute in bf16). Evaluation below uses
the default ({log["metrics"]["eval_dtype"]}). `output_router_logits` is off in the saved config:
pass `output_router_logits=False` to `generate` if you turn it on.

## Data

Task `arith` (`moesteer.evals.tasks.arith`, default `ArithConfig`): {TASK.min_steps}-{TASK.max_steps}
operators, operands 0-{TASK.max_operand}, `+`/`-`, and `* d` (d in 2..9) with probability
{TASK.mul_prob} per step, evaluated left to right. Format:

```
Q: 37 + 48 - 12 = ?
37 + 48 = 85

85 - 12 = 73

#### 73
```

The prompt is the first line; the model writes the chain of thought and the `#### answer`
line, then `<eos>`. Training problems are drawn on the fly and never repeat a validation or test
prompt.

## Training

{cfg["steps"]} AdamW steps (betas 0.9/0.95, weight decay {cfg["weight_decay"]} on matrices except
embeddings), batch {cfg["batch"]} x {cfg["seq_len"]} packed tokens ({log["tokens_seen"] / 1e6:.1f}M
tokens), loss on the answer part only, peak learning rate {cfg["lr"]}, {cfg["warmup_steps"]} warmup
steps then cosine to {cfg["min_lr_ratio"]}x, gradient clipping {cfg["grad_clip"]}, load-balancing
aux loss coefficient {spec["aux_loss_coef"]}, float32, seed {cfg["seed"]}, CPU threads {cfg["threads"]}:
{log["train_seconds"] / 60:.1f} minutes of wall time (on a 2-core machine that may have been shared
with other jobs).
Final training loss (cross-entropy per answer token, mean of the last 100 steps):
{log["final_loss"]:.4f}.

## Evaluation (greedy, batched with left padding, max {MAX_NEW_TOKENS} new tokens)

Greedy accuracy on test ({m["test_problems"]} problems): {m["test_accuracy"]:.4f}
Greedy accuracy on validation ({m["validation_problems"]} problems): {m["validation_accuracy"]:.4f}

Test accuracy by number of operators: {by_steps}.

Expert load per layer on the test gold sequences (share of top-{spec["top_k"]} assignments per
expert; load entropy normalised by ln {spec["experts"]}, 1.0 = perfectly balanced):

| layer | load entropy | max share |
|---|---|---|
{layers}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from moesteer.assets import default_model_path

path = default_model_path()
tok = AutoTokenizer.from_pretrained(path)  # prepends <bos>, pads on the left
model = AutoModelForCausalLM.from_pretrained(path)
enc = tok(["Q: 37 + 48 - 12 = ?\\n"], return_tensors="pt")
out = model.generate(**enc, max_new_tokens={MAX_NEW_TOKENS}, do_sample=False)
print(tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True))
```

## Reproduce

```
{log["command"]}
```

(transformers {log["versions"]["transformers"]}, torch {log["versions"]["torch"]}; bit-identical
only with the same versions and thread count.)

## License

Apache-2.0
"""
    (out / "README.md").write_text(card)
