"""Helpers every command shares: the one error boundary, option types, strategy and model loading."""

from __future__ import annotations

import ast
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from moesteer.checks import parse_kv
from moesteer.lm import LM, load
from moesteer.sampling import MAX_SEED
from moesteer.strategies import spec
from moesteer.strategy import Strategy

USER_ERRORS = (ValueError, OSError)
"""What the library raises for bad input (one line naming the bad value); anything else is a bug."""


def one_line(message: str) -> str:
    """``message`` on one line (a multi-line message's lines joined with "; ")."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or "unknown error"


def fail(message: str) -> NoReturn:
    """Stop the command with ``error: message`` and exit code 2 (reported by :class:`ErrorBoundary`)."""
    raise click.ClickException(message)


class ErrorBoundary(click.Group):
    """The CLI's one error boundary.

    Bad input — the library's ``ValueError`` / ``OSError`` and click's usage errors — ends the
    command with one line ``error: ...`` on stderr and exit code 2, no traceback (``--debug``
    re-raises the library's errors with their traceback). Any other exception is a bug and keeps
    its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            if ctx.params.get("debug") or isinstance(err, BrokenPipeError):
                raise
            raise click.ClickException(str(err)) from err

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as err:
            click.echo(f"error: {one_line(err.format_message())}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def positive(maximum: int | None = None) -> click.IntRange:
    """The type of every count option (``--limit``, ``--n``, ``--max-tokens``, ...): 1..maximum."""
    return click.IntRange(min=1, max=maximum)


SEED = click.IntRange(0, MAX_SEED)


# ---- shared options --------------------------------------------------------------------------


def options(*decorators: Callable) -> Callable:
    """Apply several click options in the order they are listed (as ``--help`` shows them)."""

    def apply(command: Callable) -> Callable:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


model_options = options(
    click.option(
        "--model",
        default=None,
        help="Hub id, local path, or an embedded test-bed model: mix, mix3 (default: the embedded arith MoE).",
    ),
    click.option(
        "--dtype",
        default=None,
        help="auto (default: the checkpoint's on a GPU, float32 on CPU), float32, bfloat16, float16.",
    ),
    click.option("--device", default=None, help="Torch device, e.g. cpu or cuda:0."),
)


def backend_option(description: str = "Engine.") -> Callable:
    """``--backend hf|vllm`` (default hf)."""
    return click.option(
        "--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True, help=description
    )


unsafe_exec_option = click.option(
    "--unsafe-exec",
    is_flag=True,
    help="Code tasks: run generated programs without OS isolation when bubblewrap is missing (unsafe).",
)


strategy_options = options(
    click.option(
        "--strategy",
        "strategy_text",
        default=None,
        help='Strategy spec or bare name, e.g. topk or "ranks(2)" (default: plain); see `moesteer strategies`.',
    ),
    click.option(
        "-p",
        "--param",
        "params",
        multiple=True,
        metavar="KEY=VALUE",
        help="Parameter of a bare --strategy name (repeatable): -p k=1 means topk(k=1).",
    ),
)


# ---- helpers ---------------------------------------------------------------------------------


def _value_text(raw: str) -> str:
    """A ``-p`` value as spec text: a Python literal, a nested spec such as ``roe(samples=4)``, else a string."""
    try:
        return repr(ast.literal_eval(raw))
    except (ValueError, TypeError, SyntaxError):
        pass
    try:
        if isinstance(ast.parse(raw, mode="eval").body, ast.Call):
            return raw
    except SyntaxError:
        pass
    return repr(raw)


def parse_strategy(text: str | None, params: tuple[str, ...]) -> Strategy:
    """``--strategy`` plus ``-p key=value`` as one strategy, validated by :func:`spec.parse`."""
    if params:
        if text is None:
            raise ValueError("-p sets parameters of a strategy; name it with --strategy, e.g. --strategy topk -p k=1")
        name = text.strip()
        if not name.isidentifier():
            raise ValueError(f"-p needs a bare strategy name, got --strategy {text!r}; give parameters in one place")
        values = parse_kv(params, "parameter", "-p beta=0.5")
        text = f"{name}({', '.join(f'{k}={_value_text(v)}' for k, v in values.items())})"
    return spec.parse(text or "plain")


def read_prompts(arguments: tuple[str, ...], path: Path | None) -> list[str]:
    """Prompts from the command line, then from a JSONL file (one ``{"prompt": ...}`` a line)."""
    prompts = list(arguments)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} not found")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected an object with a "prompt" string')
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError("no prompts: give PROMPT arguments or --prompts FILE.jsonl")
    return prompts


def load_lm(model: str | None, dtype: str | None, device: str | None, backend: str = "hf") -> LM:
    start = time.perf_counter()
    if backend == "vllm" and device not in (None, "cpu"):
        raise ValueError(f"--device {device} is for backend hf; vLLM picks its device itself")
    lm = load(model, dtype=dtype, device=device) if backend == "hf" else load(model, dtype=dtype, backend=backend)
    seconds = time.perf_counter() - start
    click.echo(
        f"loaded {lm.name} ({lm.adapter.model_type}, MoE layers {list(lm.moe_layers)}) in {seconds:.1f}s", err=True
    )
    return lm


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class ImageFile(click.ParamType):
    """A picture to write (``--plot``, ``--out``): its folder must exist, its suffix be a known format."""

    name = "image"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(value)
        if not path.absolute().parent.is_dir():
            self.fail(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist", param, ctx)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            self.fail(f"cannot write {str(path)!r}: the suffix must be one of {', '.join(IMAGE_SUFFIXES)}", param, ctx)
        return path
