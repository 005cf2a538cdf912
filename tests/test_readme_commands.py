"""Every ``moesteer`` command in the code blocks of the README and docs/, and in the examples of
each command's --help, parses: a known command with known options and valid values, its strategy
specs included (files and folders it names need not exist). Nothing runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from moesteer.cli import main
from moesteer.cli.common import parse_strategy

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"|", ">", ">>", "<", "&&", "||", ";", "&", "2>&1"}  # where the moesteer command ends


def commands(page: Path) -> list[str]:
    """The arguments after ``moesteer`` of each command line in the page's fenced code blocks."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)
    return command_lines(blocks)


def command_lines(blocks: list[str]) -> list[str]:
    """The ``moesteer`` command lines of code blocks, but for those the page shows refused (an
    ``error:`` line right after them)."""
    found = []
    for block in blocks:
        lines = [line.strip().removeprefix("$ ") for line in block.replace("\\\n", " ").splitlines()]
        for line, after in zip(lines, [*lines[1:], ""], strict=True):
            if not re.match(r"(\w+=\S*\s+)*moesteer(\s|$)", line) or after.startswith("error: "):
                continue
            words = shlex.split(line, comments=True)
            while re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value before the command
                words.pop(0)
            end = next((i for i, w in enumerate(words) if w in SHELL), len(words))
            found.append(shlex.join(words[1:end]))
    return found


def parse(args: list[str]) -> None:
    """Parse ``moesteer ARGS`` down to the leaf command without running it, and its strategy specs."""
    command, name, ctx = main, "moesteer", None
    while isinstance(command, click.Group):
        ctx = command.make_context(name, args, parent=ctx)
        name, command, args = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    params = command.make_context(name, args, parent=ctx).params
    for text in [*params.get("strategies", ()), params.get("strategy_text"), params.get("against")]:
        if text is not None:
            parse_strategy(text, params.get("params", ()))


def help_texts(group: click.Group = main, prefix: str = "moesteer") -> dict[str, str]:
    """Each command's help text by its name."""
    texts = {}
    for name, command in group.commands.items():
        texts[f"{prefix} {name} --help"] = command.help or ""
        if isinstance(command, click.Group):
            texts.update(help_texts(command, f"{prefix} {name}"))
    return texts


ALL = [(page.name, line) for page in PAGES for line in commands(page)]
ALL += [(where, line) for where, text in help_texts().items() for line in command_lines([text])]


def test_the_readme_and_the_help_have_commands_to_check():
    assert sum(page == "README.md" for page, _ in ALL) >= 5  # the quickstart; the rest is in docs/
    assert sum(page.endswith(".md") and page != "README.md" for page, _ in ALL) >= 40
    assert sum(page.endswith("--help") for page, _ in ALL) >= 25


@pytest.mark.parametrize(("page", "line"), ALL)
def test_a_documented_command_parses(page, line):
    try:
        parse(shlex.split(line))
    except click.exceptions.Exit:  # --help
        pass
    except click.BadParameter as err:
        assert "does not exist" in err.format_message(), f"{page}: moesteer {line}: {err.format_message()}"
    except (click.ClickException, ValueError) as err:
        pytest.fail(f"{page}: moesteer {line}: {err}")


def test_a_wrong_command_does_not_parse():
    for args in (["compare", "runs", "--basline", "plain"], ["eval", "--task", "arith", "--n", "0"], ["generat"]):
        with pytest.raises(click.ClickException):
            parse(args)
    with pytest.raises(ValueError, match="did you mean 'scmoe'"):
        parse(["generate", "--strategy", "scmo(beta=0.5)", "Q: 1 + 2 = ?"])
