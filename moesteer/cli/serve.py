"""``moesteer serve``."""

from __future__ import annotations

from pathlib import Path

import click

from moesteer.serve.requests import ALLOWABLE, ServeOptions, parse_aliases


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model", required=False)
@click.option(
    "--alias",
    "aliases",
    multiple=True,
    metavar="NAME=SPEC",
    help="A model alias (repeatable): model='<served>+NAME' runs SPEC, for clients that send no vllm_xargs.",
)
@click.option(
    "--data-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The folder whose files strategies may read (steermoe, rice, replay, c3po references); default: none.",
)
@click.option(
    "--allow",
    "allow",
    multiple=True,
    type=click.Choice(ALLOWABLE),
    help="Also serve: capacity (couples requests), gradients (c3po, rerouting on an HF copy). Repeatable.",
)
@click.pass_context
def serve(ctx: click.Context, model: str | None, aliases: tuple[str, ...], data_dir: Path | None, allow) -> None:
    """Serve MODEL (default: the embedded tiny MoE) over vLLM's OpenAI-compatible API, each request
    with its own strategy. Other options are vllm serve's own (--port, --max-model-len, ...).

    A request steers with extra_body={"vllm_xargs": {"moesteer": "scmoe(beta=0.5)"}} (the
    --strategy text of moesteer generate) or model="<served>+<alias>"; without either it is
    vLLM's own. Binds 127.0.0.1 unless --host says otherwise. See docs/serve.md.

    \b
    Examples:
      moesteer serve --port 8000
      moesteer serve --alias scmoe="scmoe(beta=0.5)" --alias roe="roe(samples=4)"
      moesteer serve allenai/OLMoE-1B-7B-0924 --data-dir tables/ --max-model-len 4096
    """
    from moesteer.lm import check_loadable
    from moesteer.serve.server import ServeCommand, serve, served_name

    flags = list(ctx.args)
    if model is not None and model.startswith("-"):  # no MODEL: the first vLLM flag took its place
        model, flags = None, [model, *flags]
    options = ServeOptions(parse_aliases(aliases), data_dir, frozenset(allow))
    resolved = check_loadable(model)
    serve(ServeCommand(resolved, served_name(model, resolved), options, tuple(flags)))
