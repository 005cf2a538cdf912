"""``moesteer lm-eval``: lm-evaluation-harness with the steered ``moesteer`` model registered."""

from __future__ import annotations

import click

from moesteer.cli.common import fail


@click.command(
    "lm-eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def lm_eval_command(ctx: click.Context) -> None:
    """Run lm-evaluation-harness with the steered `moesteer` model registered (all arguments go to lm-eval).

    \b
    Example:
      moesteer lm-eval --model moesteer --model_args "strategy=scmoe(beta=0.5)" \\
          --tasks my_task --include_path tasks/ --limit 20
    """
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate

        from moesteer.evals.harness import check_model_args, split_model_args  # registers the model
    except ImportError:
        fail("lm-eval is not installed; pip install 'moesteer[lm-eval]'")
    if _option(ctx.args, "--model") == "moesteer":
        check_model_args(split_model_args(_option(ctx.args, "--model_args") or ""))
    sys.argv = ["lm-eval", *ctx.args]
    cli_evaluate()


def _option(args: list[str], name: str) -> str | None:
    """The value of option ``name`` in raw arguments (``name VALUE`` or ``name=VALUE``)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
    return None
