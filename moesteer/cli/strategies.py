"""``moesteer strategies``: the registered strategies in a table, or one of them in full."""

from __future__ import annotations

import textwrap

import click

from moesteer.cli.table import format_table, wide_option
from moesteer.strategies.catalog import Entry, entries, entry

LIST_WIDTH = 100
"""The table of all strategies fits a terminal this wide (``--wide``: the full paper citations)."""

_EXAMPLE_PROMPT = '"Q: 12 + 7 * 3 = ?"'


@click.command("strategies")
@click.argument("name", required=False)
@wide_option
def list_strategies(name: str | None, wide: bool) -> None:
    """List every registered strategy (level, paper, what it does to routing), or describe NAME in full.

    \b
    Examples:
      moesteer strategies
      moesteer strategies scmoe          # every parameter with its type, default and meaning
      moesteer generate --strategy topk -p k=1 "Q: 3 + 4 = ?"
    """
    if name is not None:
        click.echo(describe(entry(name)))
        return
    if wide:  # the full citation, last
        header = ["name", "level", "what it does to routing", "paper"]
        click.echo(format_table(header, [[e.name, e.level, e.summary, e.paper or "—"] for e in entries()], width=None))
    else:
        header = ["name", "level", "arXiv", "what it does to routing"]
        rows = [[e.name, e.level, e.arxiv or "—", e.summary] for e in entries()]
        click.echo(format_table(header, rows, width=LIST_WIDTH, wrap=("what it does to routing",)))
    click.echo("\nmoesteer strategies NAME: its parameters, paper and an example", err=True)


def describe(e: Entry) -> str:
    """One strategy in full: level, paper, description, parameters with their meanings, an example."""
    lines = [f"{e.name}: a {e.level}-level strategy", f"paper: {e.paper or 'none'}", "", e.description, ""]
    lines.append("parameters:" if e.parameters else "parameters: none")
    for p in e.parameters:
        lines.append(f"  {p.name}: {p.type}" + ("  (required)" if p.default is None else f" = {p.default}"))
        lines += textwrap.wrap(p.meaning, LIST_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    command = "moesteer eval --task arith --limit 20" if e.level == "sequence" else "moesteer generate"
    prompt = "" if e.level == "sequence" else f" {_EXAMPLE_PROMPT}"
    lines += ["", "example:", f'  {command} --strategy "{e.example}"{prompt}']
    return "\n".join(lines)
