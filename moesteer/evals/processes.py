"""What the code sandbox and the in-process guard share: the result type and process helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program.

    ``status``: ``passed`` (ran to the end, confirmed by the nonce), ``failed`` (raised, e.g. a failed
    ``assert`` or a syntax error), ``timeout`` (wall-clock or CPU limit), ``memory`` (``MemoryError``
    under the memory limit), ``error`` (ended without finishing its tests: early exit, a signal,
    the interpreter failing). ``detail`` is one line: the exception or what stopped the process.
    """

    passed: bool
    status: Literal["passed", "failed", "timeout", "error", "memory"]
    detail: str


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit, without reaping it; whether it exited."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
    return True


def kill_group(pgid: int) -> None:
    """SIGKILL a process group (gone already is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
