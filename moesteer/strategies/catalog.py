"""What ``moesteer strategies`` shows of each registered strategy, read from its class.

A strategy's docstring is Google-style (shown without its ````code```` marks): its first sentence
is the summary (what it does to routing; parenthesised remarks dropped), ``Args:`` gives each
parameter's meaning and ``Example: spec`` an example spec; a class inherits the ``Args:`` of its
bases. The paper is the class's ``paper``, written "Title (Authors, arXiv id)".
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from moesteer.routing import Policy
from moesteer.strategies import spec
from moesteer.strategy import Strategy

_ARXIV = re.compile(r"arXiv[ :]?(\d{4}\.\d{4,5})")
_SECTION = re.compile(r"^(Args|Example):\s*(.*)$")
_REMARK = re.compile(r"\s*\([^()]*\)")


@dataclass(frozen=True)
class Parameter:
    """One parameter: its type, default (``None``: required) and meaning from the docstring."""

    name: str
    type: str
    default: str | None
    meaning: str


@dataclass(frozen=True)
class Entry:
    """One registered strategy as ``moesteer strategies`` lists and describes it."""

    name: str
    level: str  # "routing", "token" or "sequence"
    paper: str  # "" when it comes from no paper
    summary: str
    description: str  # the docstring without its Args and Example sections
    parameters: tuple[Parameter, ...]
    example: str

    @property
    def arxiv(self) -> str:
        """The paper's arXiv id, e.g. ``2405.14507`` ("" when it has none)."""
        found = _ARXIV.search(self.paper)
        return found.group(1) if found else ""


def entries() -> list[Entry]:
    return [entry(name) for name in spec.names()]


def entry(name: str) -> Entry:
    """The entry of the strategy registered as ``name`` ("did you mean" ``ValueError`` otherwise)."""
    cls = spec.resolve(name)
    description, _, example = _sections(cls.__doc__ or "")
    meanings: dict[str, str] = {}
    for base in cls.__mro__:  # a subclass's own Args first, then its bases'
        for key, meaning in _sections(base.__dict__.get("__doc__") or "")[1].items():
            meanings.setdefault(key, meaning)
    parameters = tuple(
        Parameter(key, type_name, None if default == "required" else _shown(default), meanings.get(key, ""))
        for key, type_name, default in spec.parameters(cls)
    )
    paper = getattr(cls, "paper", "")
    return Entry(
        name=name,
        level="routing" if issubclass(cls, Policy) else cls.level,
        paper="" if paper == "—" else paper,
        summary=_summary(description),
        description=description,
        parameters=parameters,
        example=example or f"{name}()",
    )


def _shown(default: object) -> str:
    return spec.to_spec(default) if isinstance(default, Strategy | Policy) else repr(default)


def _sections(doc: str) -> tuple[str, dict[str, str], str]:
    """``(prose, {parameter: meaning}, example)`` of a Google-style docstring, without code marks."""
    prose: list[str] = []
    meanings: dict[str, str] = {}
    example, section, current = "", None, ""
    for line in inspect.cleandoc(doc).replace("``", "").splitlines():
        header = _SECTION.match(line)
        if header:
            section, example = header.group(1), header.group(2).strip() or example
            continue
        if section is not None and not line.strip():
            section = None
        elif section == "Args" and not line.startswith(" " * 8):
            current, _, meaning = line.strip().partition(":")
            meanings[current] = meaning.strip()
        elif section == "Args":
            meanings[current] += " " + line.strip()
        elif section == "Example":
            example = example or line.strip()
        else:
            prose.append(line)
    return "\n".join(prose).strip(), meanings, example


def _summary(description: str) -> str:
    """The first sentence (or clause before ";") of ``description``, without remarks in parentheses
    or its full stop."""
    paragraph = " ".join(description.split("\n\n")[0].split())
    while _REMARK.search(paragraph):
        paragraph = _REMARK.sub("", paragraph)
    return re.split(r"(?<=\.)(?<!e\.g\.)(?<!i\.e\.)\s|;", paragraph)[0].rstrip(".")
