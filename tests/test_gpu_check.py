"""``bench/gpu_check.py --device cpu``: the GPU check's small run, so the script that measures the
GPU paths cannot rot where no GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_the_gpu_check_runs_small_on_the_cpu_and_lists_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    names = [c["name"] for c in result["checks"]]
    assert result["passed"] and all(c["passed"] for c in result["checks"])
    assert {name.split("/")[0] for name in names} == {"A1", "A2"}
    assert any(n.endswith("/scmoe") for n in names) and any(n.startswith("A2/vllm/") for n in names)
    assert {(row["batch"], row["strategy"]) for row in result["speed"]} >= {(1, "plain"), (4, "scmoe"), (4, "roe(4)")}
