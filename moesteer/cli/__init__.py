"""The ``moesteer`` command line: a thin layer over the Python API.

stdout carries results only (generated text, JSON lines, tables, summaries); progress and timings go
to stderr. Bad input (model, device, strategy, parameter, file, option) prints one line
``error: ...`` and exits with code 2, no traceback; ``moesteer --debug ...`` shows the traceback.
"""

from __future__ import annotations

import click

from moesteer.cli import (  # one module per command
    compare,
    data,
    demo,
    eval,
    experts,
    generate,
    lm_eval,
    references,
    report,
    serve,
    strategies,
    tune,
)
from moesteer.cli.common import ErrorBoundary
from moesteer.cli.generate import JSON_FIELDS
from moesteer.progress import quiet_library_bars


@click.group(cls=ErrorBoundary, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moesteer")
@click.option("--debug", is_flag=True, help="Show the traceback of a bad-input error instead of one line.")
def main(debug: bool) -> None:
    """Steer Mixture-of-Experts language models at test time through their routers."""
    quiet_library_bars()


for command in (
    generate.generate,
    strategies.list_strategies,
    generate.inspect,
    eval.eval_command,
    compare.compare,
    report.report,
    tune.tune,
    data.data,
    lm_eval.lm_eval_command,
    demo.demo,
    references.references,
    experts.experts,
    serve.serve,
):
    main.add_command(command)

__all__ = ["JSON_FIELDS", "main"]
