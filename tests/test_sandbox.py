"""The code sandbox: each bad program fails alone, the machine is left clean (no processes, no temp dirs)."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moesteer.evals.sandbox import run_program

HUMANEVAL_STYLE = '''
def add(a: int, b: int) -> int:
    """Sum of a and b."""
    return a + b


def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0


check(add)
'''


@pytest.fixture
def sandbox_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp root for the sandbox's directories; after the test it must be empty and no process may be left."""
    root = tmp_path / "sandbox-tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    assert list(root.iterdir()) == [], "a sandbox directory was left behind"
    assert _stray_processes(root) == [], "a sandboxed process was left running"


def _stray_processes(root: Path) -> list[int]:
    """Children of this test process (zombies included) and any process whose working directory is under ``root``."""
    stray = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        if ppid == os.getpid() or cwd.startswith(str(root)):
            stray.append(int(entry.name))
    return stray


def test_correct_solution_passes(sandbox_tmp: Path) -> None:
    result = run_program(HUMANEVAL_STYLE)
    assert (result.passed, result.status, result.detail) == (True, "passed", "")


def test_failed_assertion_and_exception(sandbox_tmp: Path) -> None:
    result = run_program(HUMANEVAL_STYLE.replace("return a + b", "return a - b"))
    assert (result.passed, result.status, result.detail) == (False, "failed", "AssertionError")
    result = run_program("def f(:\n    pass")
    assert result.status == "failed" and result.detail.startswith("SyntaxError")
    result = run_program("raise KeyError('missing')")
    assert (result.status, result.detail) == ("failed", "KeyError: 'missing'")


def test_exit_before_the_tests_is_not_a_pass(sandbox_tmp: Path) -> None:
    assert run_program("import sys\nsys.exit(0)\nassert False").status == "failed"
    assert run_program("import os\nos._exit(0)").status == "error"


@pytest.mark.parametrize("source", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_times_out(sandbox_tmp: Path, source: str) -> None:
    result = run_program(source, timeout=1.0)
    assert (result.passed, result.status) == (False, "timeout")


def test_os_system_is_refused(sandbox_tmp: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    result = run_program(f"import os\nos.system('touch {marker}')")
    assert (result.status, result.detail) == ("error", "refused: os.system")
    assert not marker.exists()


def test_refusal_is_not_swallowed_by_except_exception(sandbox_tmp: Path) -> None:
    result = run_program("import os\ntry:\n    os.system('true')\nexcept Exception:\n    pass")
    assert result.status == "error"


@pytest.mark.parametrize(
    ("source", "refused"),
    [
        ("import os\nwhile True:\n    os.fork()", "os.fork"),
        ("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '60'])", "subprocess.Popen"),
        ("import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()", "os.fork"),
        (
            "import multiprocessing as mp\nwhile True:\n    mp.get_context('spawn').Process(target=print).start()",
            "subprocess (fork_exec)",
        ),
        ("import os\nos.posix_spawn('/bin/sleep', ['sleep', '60'], {})", "os.posix_spawn"),
        ("import pty\npty.fork()", "os.forkpty"),
    ],
)
def test_fork_bomb_fails_without_leaking_processes(sandbox_tmp: Path, source: str, refused: str) -> None:
    result = run_program(source, timeout=5.0)
    assert (result.passed, result.status, result.detail) == (False, "error", f"refused: {refused}")


def test_process_escaping_the_guard_is_killed_with_its_group(sandbox_tmp: Path) -> None:
    """ctypes gets past the guard (it is not a security boundary); the group kill still reaps the child."""
    source = "import ctypes, time\nctypes.CDLL(None).fork()\ntime.sleep(60)"
    assert run_program(source, timeout=1.0).status == "timeout"


@pytest.mark.parametrize(
    "source", ["x = bytearray(8 * 2**30)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"]
)
def test_memory_bomb_hits_the_limit(sandbox_tmp: Path, source: str) -> None:
    result = run_program(source, memory_mb=256, timeout=10.0)
    assert not result.passed and result.status in ("memory", "error")


def test_deleting_outside_the_working_directory_is_refused(sandbox_tmp: Path, tmp_path: Path) -> None:
    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    for call in (f"os.remove({str(victim)!r})", f"os.unlink({str(victim)!r})", f"shutil.rmtree({str(victim_dir)!r})"):
        result = run_program(f"import os, shutil\n{call}")
        assert result.status == "error" and "outside the working directory" in result.detail, call
    result = run_program(f"open({str(victim)!r}, 'w').write('overwritten')")
    assert result.status == "error"
    assert victim.read_text() == "keep me"


def test_files_inside_the_working_directory_are_allowed(sandbox_tmp: Path) -> None:
    source = (
        "import os, shutil, tempfile\n"
        "open('scratch.txt', 'w').write('x')\n"
        "os.remove('scratch.txt')\n"
        "shutil.rmtree(tempfile.mkdtemp())\n"
        "os.makedirs('locked/inner')\n"
        "os.chmod('locked', 0)\n"  # left behind unreadable: the cleanup must still remove it
    )
    assert run_program(source).status == "passed"


@pytest.mark.parametrize(
    "source",
    [
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
        "import socket\nsocket.create_connection(('pypi.org', 443), timeout=2)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
    ],
)
def test_network_is_refused(sandbox_tmp: Path, source: str) -> None:
    result = run_program(source)
    assert result.status == "error" and "no network" in result.detail


def test_parallel_calls_are_independent(sandbox_tmp: Path) -> None:
    sources = [HUMANEVAL_STYLE, "assert False", HUMANEVAL_STYLE, "import os\nos.system('true')"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = [result.status for result in pool.map(run_program, sources)]
    assert statuses == ["passed", "failed", "passed", "error"]
