"""``moesteer generate`` and ``moesteer inspect``."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import click

from moesteer.analysis.usage import load_distance, plot_usage, topk_overlap, usage_panels, usage_summary
from moesteer.cli.common import (
    SEED,
    ImageFile,
    backend_option,
    fail,
    load_lm,
    model_options,
    parse_strategy,
    positive,
    read_prompts,
    strategy_options,
)
from moesteer.lm import LM
from moesteer.sampling import MAX_N, MAX_TOKENS, Completion, SamplingParams
from moesteer.strategy import Strategy, TokenStrategy
from moesteer.trace import RoutingTrace
from moesteer.trace_file import TraceFile

JSON_FIELDS = (
    "prompt_index",
    "sample_index",
    "text",
    "token_ids",
    "logprobs",
    "finish_reason",
    "forward_passes",
    "token_rows",
    "seconds",
    "info",
    "cost",
)


def _num_experts(lm: LM) -> int:
    return lm.engine.routing_sizes()[0]


def _inspect_sets(lm: LM, strategy: Strategy, sets: tuple[Path, Path], out: Path, counts: bool) -> None:
    """``inspect --sets``: the two prompt sets' expert usage over their span tokens, compared."""
    from moesteer.analysis.experts import span_load
    from moesteer.evals.data import read_jsonl

    if not isinstance(strategy, TokenStrategy):
        fail("--sets routes under a routing or token strategy (its first branch)")
    loads, names = [], []
    for path in sets:
        load_, tokens = span_load(lm.engine, read_jsonl(path), strategy.branches()[0])
        loads.append(load_)
        names.append(f"{path.name} ({tokens} span tokens)")
    click.echo(f"expert-usage distance (total variation; 0 = the same, 1 = disjoint) under {strategy.spec()}")
    click.echo(f"{names[0]} vs {names[1]}")
    layers = list(lm.moe_layers)
    click.echo(
        "\n".join(f"layer {layer}: {float(d):.3f}" for layer, d in zip(layers, load_distance(*loads), strict=True))
    )
    plot_usage(list(zip(names, loads, strict=True)), layers, out, counts)
    click.echo(f"wrote {out}", err=True)


# ---- commands --------------------------------------------------------------------------------


@click.command()
@click.argument("prompts", nargs=-1, metavar="PROMPT...")
@model_options
@backend_option()
@strategy_options
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option(
    "--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample from the k best tokens (0 = off)."
)
@click.option(
    "--max-tokens", type=positive(MAX_TOKENS), default=128, show_default=True, help="Tokens to generate per completion."
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of sampling and routing noise.")
@click.option("--n", type=positive(MAX_N), default=1, show_default=True, help="Independent samples per prompt.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the text.")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSONL file with one {"prompt": ...} per line (after any PROMPT arguments).',
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per completion instead of plain text.")
@click.option("--trace", is_flag=True, help="Record routing and print expert usage per layer to stderr.")
@click.option(
    "--trace-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write each completion's routing trace to this JSON file (replay it with --strategy \"replay('FILE')\").",
)
def generate(
    prompts: tuple[str, ...],
    model: str | None,
    dtype: str | None,
    device: str | None,
    backend: str,
    strategy_text: str | None,
    params: tuple[str, ...],
    temperature: float,
    top_p: float,
    top_k: int,
    max_tokens: int,
    seed: int,
    n: int,
    stop: tuple[str, ...],
    chat: bool,
    prompts_file: Path | None,
    as_json: bool,
    trace: bool,
    trace_out: Path | None,
) -> None:
    """Generate completions of PROMPTs under a strategy; only the text (or JSON) goes to stdout.

    \b
    Examples:
      moesteer generate "Q: 12 + 7 * 3 = ?"
      moesteer generate --strategy topk -p k=1 "Q: 12 + 7 * 3 = ?"
      moesteer generate --strategy "ranks(2)" --max-tokens 64 "Q: 5 * 6 - 4 = ?"
      moesteer generate --temperature 0.8 --n 4 --seed 1 --json --prompts questions.jsonl
      moesteer generate --model allenai/OLMoE-1B-7B-0924 --dtype bfloat16 --chat "Why is the sky blue?"
      moesteer generate --strategy "ranks(2)" --trace-out run.json "Q: 5 * 6 - 4 = ?"
      moesteer generate --strategy "replay('run.json', completion=0)" "Q: 5 * 6 - 4 = ?"
    """
    strategy = parse_strategy(strategy_text, params)
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop, seed=seed, n=n
    )
    texts = read_prompts(prompts, prompts_file)
    lm = load_lm(model, dtype, device, backend)
    start = time.perf_counter()
    completions = lm.generate(texts, strategy, sampling, chat=chat, trace=trace or trace_out is not None)
    seconds = time.perf_counter() - start
    _print_completions(completions, strategy.spec(), as_json)
    tokens = sum(c.num_tokens for c in completions)
    click.echo(
        f"{len(completions)} completion(s) under {strategy.spec()}: {tokens} tokens in {seconds:.2f}s "
        f"({tokens / max(seconds, 1e-9):.1f} tokens/s)",
        err=True,
    )
    if trace:
        traced = [c.trace for c in completions if c.trace is not None]
        routing = RoutingTrace([r for t in traced for r in t.records])  # every completion's own calls
        lines = usage_summary(routing, _num_experts(lm)) if traced else ["this strategy records no routing trace"]
        click.echo("\n".join(lines), err=True)
    if trace_out is not None:
        saved = TraceFile.of(completions, lm, strategy.spec())
        if not saved.completions:
            fail(f"{strategy.spec()} records no routing trace; trace a routing or token strategy")
        saved.save(trace_out)
        click.echo(f"wrote {len(saved.completions)} completion trace(s) to {trace_out}", err=True)


def _print_completions(completions: list[Completion], strategy_spec: str, as_json: bool) -> None:
    """Plain text (one block per completion, blank line between blocks) or one JSON object a line."""
    for i, c in enumerate(completions):
        if as_json:
            record = {name: getattr(c, name) for name in JSON_FIELDS}
            record["logprobs"] = [x if math.isfinite(x) else None for x in c.logprobs]  # strict JSON has no inf
            click.echo(json.dumps({**record, "strategy": strategy_spec}, ensure_ascii=False, allow_nan=False))
        else:
            click.echo(f"\n{c.text}" if i else c.text)


@click.command()
@click.argument("prompt", required=False)
@model_options
@backend_option("Engine that generates and routes (the trace and the teacher-forced routing are the same on both).")
@strategy_options
@click.option(
    "--max-tokens", type=positive(MAX_TOKENS), default=32, show_default=True, help="Tokens to generate (greedy)."
)
@click.option(
    "--sets",
    nargs=2,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='Two JSONL prompt sets ({"text"} or {"prompt", "span"}) instead of PROMPT: their span tokens\' '
    "expert usage, teacher-forced, per layer distance and side by side.",
)
@click.option("--out", type=ImageFile(), default="usage.png", show_default=True, help="Image (.png, .pdf, .svg, ...).")
@click.option("--counts", is_flag=True, help="Plot raw counts instead of each layer's shares.")
@click.option(
    "--against",
    default=None,
    help="A second strategy: print, per layer, the top-k overlap (Jaccard) of the two on the same tokens, "
    "and plot both side by side.",
)
def inspect(
    prompt: str | None,
    model: str | None,
    dtype: str | None,
    device: str | None,
    backend: str,
    strategy_text: str | None,
    params: tuple[str, ...],
    max_tokens: int,
    sets: tuple[Path, Path] | None,
    out: Path,
    counts: bool,
    against: str | None,
) -> None:
    """Generate greedily from PROMPT, plot expert usage per MoE layer as a heatmap, summarise it.

    Prompt and generated tokens all count. stdout gets, per MoE layer (decoder-layer index), the
    entropy of the expert load divided by ln(number of experts) and the busiest experts. With
    --against, both strategies route the same tokens (the prompt and this output, teacher-forced)
    and the picture shows the two side by side on one colour scale. With --sets A.jsonl B.jsonl
    instead of PROMPT, the span tokens of each set route teacher-forced under the strategy; stdout
    gets each layer's total-variation distance between the two sets' expert usage (0: the same, 1:
    disjoint experts), the picture the two usages side by side.

    \b
    Examples:
      moesteer inspect "Q: 12 + 7 * 3 = ?" --out usage.png
      moesteer inspect --strategy "ranks(2)" "Q: 12 + 7 * 3 = ?" --out rank2.png
      moesteer inspect --strategy topk -p k=1 --counts "Q: 5 * 6 = ?" --out top1.png
      moesteer inspect "Q: 12 + 7 * 3 = ?" --against "topk(3)"    # which experts the two share
      moesteer inspect --sets times.jsonl plus.jsonl --out sets.png   # how two prompt sets route
    """
    if importlib.util.find_spec("matplotlib") is None:
        fail("inspect draws with matplotlib: pip install 'moesteer[plot]'")
    if (prompt is None) == (sets is None):
        raise click.UsageError("give a PROMPT or --sets A.jsonl B.jsonl (one of them)")
    if sets is not None and against is not None:
        raise click.UsageError("--against compares two strategies on one PROMPT; --sets two prompt sets")
    strategy = parse_strategy(strategy_text, params)
    lm = load_lm(model, dtype, device, backend)
    if sets is not None:
        _inspect_sets(lm, strategy, sets, out, counts)
        return
    (completion,) = lm.generate([prompt], strategy, SamplingParams(max_tokens=max_tokens), trace=True)
    if completion.trace is None:
        fail(f"{strategy.spec()} records no routing trace; inspect a routing or token strategy")
    num_experts = _num_experts(lm)
    click.echo(f"output: {completion.text!r}", err=True)
    click.echo("\n".join([f"{lm.name} under {strategy.spec()}", *usage_summary(completion.trace, num_experts)]))
    loads = usage_panels(f"expert usage: {Path(lm.name).name} under {strategy.spec()}", completion.trace, num_experts)
    if against is not None:
        other = parse_strategy(against, ())
        if not isinstance(strategy, TokenStrategy) or not isinstance(other, TokenStrategy):
            fail("--against compares routing or token strategies (their first branch)")
        tokens = lm.engine.encode(prompt) + completion.token_ids
        ours, theirs = (lm.engine.routing(tokens, s.branches()[0]) for s in (strategy, other))
        click.echo(f"top-k overlap (Jaccard) with {other.spec()} on the same {len(tokens)} tokens")
        click.echo("\n".join(f"layer {layer}: {value:.3f}" for layer, value in topk_overlap(ours, theirs).items()))
        loads = [
            (f"{spec} (same {len(tokens)} tokens)", RoutingTrace(list(routing.values())).expert_load(num_experts))
            for spec, routing in ((strategy.spec(), ours), (other.spec(), theirs))
        ]
    plot_usage(loads, completion.trace.layers(), out, counts)
    click.echo(f"wrote {out}", err=True)
