"""Progress bars on stderr, made in one place.

On a terminal a bar redraws in place. Anywhere else (a log file, CI) each update would be one more
line, so there a bar prints a line at every tenth of its total (and at the end) instead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

STEPS = 10
"""Lines a bar prints when stderr is not a terminal (plus its first and last)."""


class _Lines:
    """A stream that gets each of tqdm's in-place redraws as one line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Bar(tqdm):
    """A tqdm bar whose ``set_postfix`` waits for the next update to be drawn (not a line of its own)."""

    def set_postfix(self, ordered_dict=None, refresh: bool = False, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def quiet_library_bars() -> None:
    """Turn off transformers' own bars (loading weights) when stderr is not a terminal, where each
    of their redraws would be one more line."""
    if not sys.stderr.isatty():
        from transformers.utils import logging

        logging.disable_progress_bar()


def progress(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str, initial: int = 0,
    disable: bool = False,
) -> Bar:  # fmt: skip
    """A tqdm bar over ``iterable`` (or ``total`` items, advanced with ``update``) on stderr."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    options: dict = {}
    if not sys.stderr.isatty():
        options = {"file": _Lines(sys.stderr), "mininterval": 0, "maxinterval": math.inf}
        options["miniters"] = max(1, math.ceil((total - initial) / STEPS)) if total else 1
        if not total:  # no total to take tenths of: a line every 30 seconds
            options["mininterval"] = 30.0
    else:
        options["file"] = sys.stderr
    return Bar(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, **options)
