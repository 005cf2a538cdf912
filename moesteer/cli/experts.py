"""``moesteer experts``: find the experts tied to a behaviour or a marker token (:mod:`moesteer.analysis.experts`)."""

from __future__ import annotations

from pathlib import Path

import click

from moesteer.cli.common import backend_option, load_lm, model_options, positive


@click.command()
@click.option(
    "--positive",
    "positive_file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help='JSONL records of the behaviour: {"text": ...} or {"prompt": ..., "span": ...}.',
)
@click.option(
    "--negative",
    "negative_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSONL records without it (risk difference, SteerMoE).",
)
@click.option("--marker", default=None, help='A marker token, e.g. "<think>" (nPMI over --positive, RICE).')
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Expert table (JSON).")
@click.option("--top", type=positive(), default=10, show_default=True, help="Rows to print.")
@backend_option("Engine that routes the records (teacher-forced prefill).")
@model_options
def experts(positive_file, negative_file, marker, out, top, backend, model, dtype, device) -> None:
    """Rank (layer, expert) pairs by how much they tie to a behaviour; write a table steermoe and rice load.

    \b
    Examples:
      moesteer experts --positive A.jsonl --negative B.jsonl --out experts.json
      moesteer experts --positive traces.jsonl --marker "<think>" --out cognitive.json
      moesteer experts --backend vllm --positive A.jsonl --negative B.jsonl --out experts.json
    """
    from moesteer.analysis.experts import npmi, risk_difference
    from moesteer.evals.data import read_jsonl

    if (negative_file is None) == (marker is None):
        raise click.UsageError("give --negative or --marker (one of them)")
    records = {}
    for name, path in (("--positive", positive_file), ("--negative", negative_file)):
        if path is not None:
            if not path.is_file():
                raise click.BadParameter(f"{path} does not exist", param_hint=name)
            records[name] = read_jsonl(path)
    lm = load_lm(model, dtype, device, backend)
    if marker is None:
        table = risk_difference(lm.engine, records["--positive"], records["--negative"])
    else:
        table = npmi(lm.engine, records["--positive"], marker)
    table.save(out)
    click.echo("layer\texpert\tscore\tcounts")
    for row in table.experts[:top]:
        counts = " ".join(f"{k}={v}" for k, v in row.counts.items())
        click.echo(f"{row.layer}\t{row.expert}\t{row.score:+.4f}\t{counts}")
    click.echo(f"wrote {out} ({table.method}, {len(table.experts)} rows)", err=True)
