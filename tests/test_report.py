"""``moesteer report``: one self-contained HTML page of runs (issue 17)."""

from __future__ import annotations

import base64
import re

from click.testing import CliRunner

from moesteer.cli import main


def test_report_holds_the_table_the_plot_and_each_runs_usage(tmp_path):
    runner = CliRunner()
    runs = tmp_path / "runs"
    args = [
        "eval",
        "--task",
        "arith",
        "--limit",
        "3",
        "--output",
        str(runs),
        "--strategy",
        "plain",
        "--strategy",
        "topk(1)",
    ]
    assert runner.invoke(main, args).exit_code == 0
    out = tmp_path / "arith.html"
    result = runner.invoke(main, ["report", str(runs / "arith"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "</html>" in page
    assert "<td>plain()</td>" in page and "<td>topk(k=1)</td>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # accuracy against cost, and one usage picture a run
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http" not in page  # self-contained: nothing to fetch
    bare = runner.invoke(main, ["report", str(runs / "arith"), "--out", str(out), "--no-usage"])
    assert bare.exit_code == 0 and len(re.findall("data:image/png", out.read_text())) == 1
    missing = runner.invoke(main, ["report", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "no results.json" in missing.output
