"""``moesteer report``: one self-contained HTML page of finished runs — the compare table, the
accuracy-vs-cost plot, and each run's expert usage (its strategy re-run with a routing trace on
the run's first problem, HF), images inlined as base64 PNG."""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Callable
from pathlib import Path

from moesteer.analysis.usage import plot_usage, usage_panels, usage_summary
from moesteer.evals.compare import Run, comparison_rows, other_costs, pick_baseline, plot, task_name
from moesteer.evals.rundir import SAMPLES, read_samples
from moesteer.sampling import SamplingParams
from moesteer.strategies.spec import parse

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f0f0f0}img{max-width:100%}
.run{margin:1.5em 0}pre{background:#f7f7f7;padding:8px;font-size:12px}"""


def _png(draw: Callable[[Path], None]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.png"
        draw(path)
        return base64.b64encode(path.read_bytes()).decode()


def _usage_section(run: Run, lm, max_tokens: int) -> str:
    strategy = run.results["strategy"]
    first = next(iter(read_samples(run.path / SAMPLES).values()), None)
    if first is None or "prompt" not in first:
        return "<p>no sample to trace</p>"
    (completion,) = lm.generate([first["prompt"]], parse(strategy), SamplingParams(max_tokens=max_tokens), trace=True)
    if completion.trace is None or not completion.trace.records:
        return "<p>this strategy records no routing trace</p>"
    experts = lm.engine.routing_sizes()[0]
    image = _png(
        lambda out: plot_usage(
            usage_panels(f"expert usage: {strategy}", completion.trace, experts),
            completion.trace.layers(),
            out,
            counts=False,
        )
    )
    summary = html.escape("\n".join(usage_summary(completion.trace, experts)))
    prompt = html.escape(first["prompt"].strip())
    return f"<p>problem {html.escape(str(first.get('id', '')))}: <code>{prompt}</code></p><pre>{summary}</pre>" + (
        f'<img alt="expert usage of {html.escape(strategy)}" src="data:image/png;base64,{image}">'
    )


def write_report(runs: list[Run], out: str | Path, lm=None, max_tokens: int = 64) -> Path:
    """Write the page to ``out``; ``lm`` (a loaded model of the runs) adds the expert-usage pictures."""
    base = pick_baseline(runs)
    header, rows = comparison_rows(runs, base)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    table += "</table>"
    for spec, counters in other_costs(runs):
        table += f"<p>other cost per sample of {html.escape(spec)}: {html.escape(counters)}</p>"
    curve = _png(lambda path: plot(runs, path))
    task = html.escape(task_name(runs[0].results))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>moesteer report: {task}</title>",
        f"<style>{STYLE}</style></head><body><h1>moesteer report: {task}</h1>",
        f"<p>{len(runs)} run{'s' * (len(runs) != 1)}; everything relative to the baseline "
        f"({html.escape(base.results['strategy'])}).</p>",
        table,
        f'<h2>Accuracy against cost</h2><img alt="accuracy against cost" src="data:image/png;base64,{curve}">',
    ]
    if lm is not None:
        parts.append("<h2>Expert usage</h2>")
        for run in runs:
            parts.append(f'<div class="run"><h3>{html.escape(run.results["strategy"])}</h3>')
            try:
                parts.append(_usage_section(run, lm, max_tokens) + "</div>")
            except (OSError, ValueError) as err:  # e.g. a reference set the page's machine lacks
                parts.append(f"<p>not traced: {html.escape(str(err).splitlines()[0])}</p></div>")
    parts.append("</body></html>")
    out = Path(out)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
