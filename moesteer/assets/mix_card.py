"""Evaluation and model card of a ``mix`` test-bed model (``tiny-mix-moe``, ``tiny-mix3-moe``), on validation only.

Measured on the saved files as a user loads them: per-family greedy accuracy on the S0 (trained
cells) and S1 (held-out cells) validation problems, 0-shot and 2-shot; per-layer load entropy and
dead experts, and the family–expert mutual information (all tokens, digit tokens), over the S0 and
S1 validation gold sequences (see :mod:`moesteer.assets.measure`). The test split is left for the
pre-registered endpoints (``docs/testbed.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from moesteer.assets.measure import greedy_completions, group_expert_information, load_stats, routing_counts
from moesteer.evals.tasks import mix
from moesteer.evals.tasks.mix.families import CHAIN_FAMILIES, FAMILIES

EVALUATIONS = (("s0", 0), ("s1", 0), ("s0", 2), ("s1", 2))
"""(bucket, shots) pairs measured on validation."""
MAX_NEW_TOKENS = {"chain": 128, "short": 16}


def greedy_correct(model, tokenizer, records: Sequence[dict[str, str]], shots: int) -> list[bool]:
    """Greedy completions scored by :func:`moesteer.evals.tasks.mix.score` (decoded per answer kind)."""
    correct: dict[int, bool] = {}
    for kind, limit in MAX_NEW_TOKENS.items():
        chosen = [i for i, r in enumerate(records) if (r["family"] in CHAIN_FAMILIES) == (kind == "chain")]
        prompts = [mix.prompt(records[i], shots) for i in chosen]
        texts = greedy_completions(model, tokenizer, prompts, limit, stop=mix.STOP)
        correct.update({i: mix.score(t, records[i]) for i, t in zip(chosen, texts, strict=True)})
    return [correct[i] for i in range(len(records))]


def by_family(records: Sequence[dict[str, str]], correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy per family and over all records (``all``)."""
    groups: dict[str, list[bool]] = {"all": list(correct)}
    for r, ok in zip(records, correct, strict=True):
        groups.setdefault(r["family"], []).append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in groups.items()}


def evaluate(out: Path, eval_problems: int | None = None, bed: str = "mix") -> dict:
    """Validation accuracy per (bucket, shots) and family on ``bed``'s problems, and routing
    statistics of the saved model."""
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = mix.BEDS[bed]
    splits = {b: mix.load_split(b, "validation", config)[:eval_problems] for b in {b for b, _ in EVALUATIONS}}
    accuracy = {
        f"{bucket}_{shots}shot": by_family(splits[bucket], greedy_correct(model, tokenizer, splits[bucket], shots))
        for bucket, shots in EVALUATIONS
    }
    gold = [r for b in ("s0", "s1") for r in splits[b]]
    texts = [r["prompt"] + r["target"] + tokenizer.eos_token for r in gold]
    groups = [FAMILIES.index(r["family"]) for r in gold]
    top_k, top_1 = routing_counts(model, tokenizer, texts, groups, len(FAMILIES))
    _, digits_top_1 = routing_counts(model, tokenizer, texts, groups, len(FAMILIES), keep_characters="0123456789")
    return {
        "validation_accuracy": accuracy,
        "validation_problems": {b: len(records) for b, records in sorted(splits.items())},
        "expert_load": load_stats(top_k),
        "family_expert_information": group_expert_information(top_1),
        "family_expert_information_digits": group_expert_information(digits_top_1),
        "eval_dtype": str(model.dtype).removeprefix("torch."),
    }


def _accuracy_table(accuracy: dict[str, dict[str, float]]) -> str:
    header = "| family | " + " | ".join(accuracy) + " |\n|---|" + "---|" * len(accuracy)
    rows = [
        f"| {family} | " + " | ".join(f"{accuracy[k][family]:.3f}" for k in accuracy) + " |"
        for family in (*FAMILIES, "all")
    ]
    return "\n".join([header, *rows])


def _layer_table(metrics: dict) -> str:
    columns = zip(
        metrics["expert_load"],
        metrics["family_expert_information"],
        metrics["family_expert_information_digits"],
        strict=True,
    )
    rows = [
        f"| {i} | {load['load_entropy']:.3f} | {load['max_share']:.3f} | {load['dead_experts']} "
        f"| {mi:.3f} | {digits:.3f} |"
        for i, (load, mi, digits) in enumerate(columns)
    ]
    header = "| layer | load entropy | max share | dead experts | family MI (all tokens) | family MI (digits) |"
    return "\n".join([header, "|---|---|---|---|---|---|", *rows])


def _balance(spec: dict) -> str:
    """Which load-balancing loss trained the model (logs before the per-layer option have no key)."""
    return "the mean of each layer's Switch loss" if spec.get("balance_per_layer") else "HF OLMoE's, pooled over layers"


def _span(sizes: tuple[int, int]) -> str:
    low, high = sizes
    return f"{low}" if low == high else f"{low}-{high}"


def _data_section(bed: str, train: dict) -> str:
    """What the bed's training documents are, from its :class:`~moesteer.evals.tasks.mix.MixConfig`."""
    config = mix.BEDS[bed]
    sizes = config.train_sizes
    weights = ", ".join(f"{family} {weight}" for family, weight in config.family_weights.items())
    kinds = ", ".join(f"{weight:.0%} {kind}" for kind, weight in config.document_kinds.items())
    return f"""`moesteer.evals.tasks.mix`, bed `{bed}` (`BEDS[{bed!r}]`; `docs/testbed.md` describes each
revision). Families: `arith` (chain of thought, {_span(sizes["arith"])} `+`/`-` operators on
0-{config.max_operand}, left to right), `logic` (chain of thought, {_span(sizes["logic"])} and/or/xor on
t/f), `strings` (sort / reverse / dedupe a {_span(sizes["strings"])}-letter word), `count` (occurrences
of a letter in {_span(sizes["count"])} letters), `compare` (which of four {_span(sizes["compare"])}-digit
options is largest / smallest). Formats: `f1` (`Q: ... = ?` / `#### 73`), `f2` (`Question: ...` /
`Answer: ...` / `the answer is 73.`), `f3` (`> 37+48-12 =>` / `[73]`); every format opens every
family's prompt the same way. Held-out cells (arith×f3, logic×f2, strings×f2, count×f3, compare×f1)
are rare: an example is rendered in its family's held-out format with probability
{config.held_out_example_prob}, and a document is all examples of one held-out cell with probability
{config.held_out_document_prob}. Otherwise documents hold 2-6 solved examples ({kinds}; family
weights {weights}), joined by blank lines, `<bos>` ... `<eos>`, packed into rows of {train["seq_len"]}
tokens. The stream never yields a validation or test prompt."""


def write_card(out: Path, log: dict, bed: str) -> None:
    """Model card (``README.md``) of a model of ``bed``: configuration, data, training, loss curve,
    validation metrics."""
    spec, cfg, m = log["model"], log["train"], log["metrics"]
    curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in log["loss_curve"])
    problems = ", ".join(f"{b.upper()} {n}" for b, n in m["validation_problems"].items())
    card = f"""---
license: apache-2.0
library_name: transformers
tags: [olmoe, mixture-of-experts, synthetic, chain-of-thought, moesteer]
---

# {out.name}

The `{bed}` test bed's model in `moesteer`: a {log["params_total"] / 1e6:.2f}M-parameter Mixture-of-Experts
language model ({log["params_active"] / 1e6:.2f}M active per token) with the OLMoE architecture
(`OlmoeForCausalLM`), trained from scratch on CPU on five synthetic task families in three surface
formats, with five rare family×format cells as a distribution shift. It exists so that
routing-steering methods can be measured against their premises (see `docs/testbed.md`); it is
not useful for anything else. Load it as `moesteer.load("{bed}")` or `--model {bed}`.

## Architecture

hidden {spec["hidden"]}, {spec["layers"]} layers, {spec["heads"]} attention heads, {spec["experts"]} experts
per layer, top-{spec["top_k"]} routing (softmax, `norm_topk_prob=False`), expert intermediate size
{spec["intermediate"]}, vocabulary {spec["vocab"]} (character-level, {log["tokenizer_size"]} tokens used),
untied embeddings, load-balancing aux loss coefficient {spec["aux_loss_coef"]} ({_balance(spec)}). Weights are stored in
bfloat16; the config's dtype is float32, so `from_pretrained` upcasts them exactly (evaluation below:
{m["eval_dtype"]}).

## Data

{_data_section(bed, cfg)}

## Training

{cfg["steps"]} AdamW steps (betas 0.9/0.95, weight decay {cfg["weight_decay"]} on matrices except
embeddings), batch {cfg["batch"]} x {cfg["seq_len"]} packed tokens ({log["tokens_seen"] / 1e6:.1f}M tokens),
loss on every token, peak learning rate {cfg["lr"]}, {cfg["warmup_steps"]} warmup steps then cosine to
{cfg["min_lr_ratio"]}x, gradient clipping {cfg["grad_clip"]}, float32, seed {cfg["seed"]}, CPU threads
{cfg["threads"]}: {log["train_seconds"] / 60:.1f} minutes of wall time, {log["tokens_seen"] / log["train_seconds"]:.0f}
tokens/s on a 2-core machine. Final training loss (cross-entropy per token,
mean of the last 100 steps): {log["final_loss"]:.4f}.

Loss curve (mean of the 100 steps before each step): {curve}.

## Evaluation (validation only; greedy, max {MAX_NEW_TOKENS["chain"]} / {MAX_NEW_TOKENS["short"]} new tokens)

Problems: {problems}. S0 = trained cells, S1 = held-out (rare) cells; 2-shot = two solved demos of the same
cell before the prompt.

{_accuracy_table(m["validation_accuracy"])}

Routing on the S0 and S1 validation gold sequences (top-{spec["top_k"]} assignment shares; load entropy
normalised by ln {spec["experts"]}; dead = share below a tenth of uniform; family MI = I(family; top-1
expert) / H(family)):

{_layer_table(m)}

## Use

```python
import moesteer

lm = moesteer.load("{bed}")
print(lm.generate(["Q: 37 + 4 - 12 = ?\\n"])[0].text)
```

## Reproduce

```
{log["command"]}
```

(transformers {log["versions"]["transformers"]}, torch {log["versions"]["torch"]}; bit-identical only with
the same versions and thread count.)

## License

Apache-2.0
"""
    (out / "README.md").write_text(card)
