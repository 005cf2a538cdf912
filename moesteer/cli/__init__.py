"""The ``moesteer`` command line: a thin layer over the Python API.

stdout carries results only (generated text, JSON lines, tables, summaries); progress and timings go
to stderr. User mistakes (bad model, strategy, parameter, file) print one line ``error: ...`` and exit
with code 2, no traceback.
"""

from __future__ import annotations

import click

from moesteer.cli import evals, generate
from moesteer.cli.generate import JSON_FIELDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moesteer")
def main() -> None:
    """Steer Mixture-of-Experts language models at test time through their routers."""


for command in (
    generate.generate,
    generate.list_strategies,
    generate.inspect,
    evals.eval_command,
    evals.compare,
    evals.tune,
    evals.data,
    evals.lm_eval_command,
    evals.demo,
):
    main.add_command(command)

__all__ = ["JSON_FIELDS", "main"]
