"""``moesteer report``: one self-contained HTML page of runs."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
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


def _browser() -> str:
    """The headless browser the Makefile installs (a missing one fails in CI, skips elsewhere)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        message = "no chromium: `make install` installs it as root (apt-get install chromium)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return found


def _coloured_share(page, shot) -> float:
    """Chromium opens ``page`` headless and screenshots it; the share of its pixels with colour."""
    from PIL import Image

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    command = [_browser(), *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()]
    env = {**os.environ, "HOME": str(shot.parent)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("HSV")
    assert image.size == (1200, 2400)
    return float((torch.tensor(list(image.getdata()))[:, 1] > 80).float().mean())


def test_the_report_renders_in_a_real_headless_browser(tmp_path):
    """The page's pictures (accuracy against cost, each run's usage heatmap) render in a real
    browser with no network: colour covers a share of the screenshot that the same page with its
    pictures unreadable (broken-image icons) does not reach."""
    runner = CliRunner()
    runs = tmp_path / "runs"
    args = ["eval", "--task", "arith", "--limit", "3", "--output", str(runs), "--strategy", "plain"]
    assert runner.invoke(main, [*args, "--strategy", "ranks(2)"]).exit_code == 0
    page = tmp_path / "arith.html"
    assert runner.invoke(main, ["report", str(runs / "arith"), "--out", str(page)]).exit_code == 0
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"data:image/png;base64,[^\"]+", "data:image/png;base64,AAAA", page.read_text()))
    rendered, without = _coloured_share(page, tmp_path / "page.png"), _coloured_share(broken, tmp_path / "broken.png")
    assert rendered > 0.02 > without, f"coloured: {rendered:.1%} rendered, {without:.1%} with broken pictures"


def test_inspect_against_prints_the_top_k_overlap_of_two_strategies(tmp_path):
    runner = CliRunner()
    for other, expected in (("topk(3)", 2 / 3), ("ranks(2)", 1 / 2)):  # vs the trained top-2, in the first
        # MoE layer (the later ones see hidden states the other routing has changed)
        args = ["inspect", "Q: 12 + 7 * 3 = ?", "--against", other, "--out", str(tmp_path / "u.png")]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("top-k overlap"))
        values = [float(line.split(": ")[1]) for line in lines[start + 1 :]]
        assert len(values) == 4 and abs(values[0] - expected) < 1e-3 and all(0 <= v <= 1 for v in values)
    same = runner.invoke(main, ["inspect", "Q: 12 + 7 * 3 = ?", "--against", "plain", "--out", str(tmp_path / "u.png")])
    assert same.stdout.splitlines()[-4:] == [f"layer {layer}: 1.000" for layer in range(4)]


def test_inspect_against_draws_the_two_side_by_side(tmp_path):
    from PIL import Image

    from moesteer.analysis.usage import plot_usage

    load = torch.randint(0, 9, (4, 16))
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    plot_usage([("a", load)], [0, 1, 2, 3], one, counts=False)
    plot_usage([("a", load), ("b", load.flip(-1))], [0, 1, 2, 3], two, counts=False)
    (w1, h1), (w2, h2) = Image.open(one).size, Image.open(two).size
    assert 1.6 < w2 / w1 < 2.3 and abs(h2 - h1) / h1 < 0.2  # a second panel beside the first, one colour bar
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(main, ["inspect", "Q: 5 * 6 = ?", "--against", "ranks(2)", "--out", str(out)])
    assert result.exit_code == 0 and Image.open(out).size[0] > Image.open(out).size[1] * 3


def test_inspect_sets_compares_two_prompt_sets(tmp_path):
    """Per layer the total-variation distance of two sets' span-token expert usage: 0 for a set and
    itself, above 0 for '*' steps against '+' steps; the picture holds both side by side."""
    times, plus = tmp_path / "times.jsonl", tmp_path / "plus.jsonl"
    times.write_text(
        "".join(json.dumps({"prompt": f"Q: {a} * {a + 2} = ?\n", "span": f"{a} * {a + 2}"}) + "\n" for a in range(3, 9))
    )
    plus.write_text(
        "".join(json.dumps({"prompt": f"Q: {a} + {a + 2} = ?\n", "span": f"{a} + {a + 2}"}) + "\n" for a in range(3, 9))
    )
    runner = CliRunner()

    def distances(first, second):
        result = runner.invoke(main, ["inspect", "--sets", str(first), str(second), "--out", str(tmp_path / "s.png")])
        assert result.exit_code == 0, result.output
        return [float(line.split(": ")[1]) for line in result.stdout.splitlines() if line.startswith("layer ")]

    assert distances(times, times) == [0.0] * 4
    apart = distances(times, plus)
    assert len(apart) == 4 and all(0 < d <= 1 for d in apart)
    both = runner.invoke(main, ["inspect", "Q: 1 + 2 = ?", "--sets", str(times), str(plus)])
    assert both.exit_code == 2 and "give a PROMPT or --sets" in both.output


def test_a_branched_strategys_usage_is_summarised_and_drawn_per_branch(tmp_path):
    """SCMoE's strong (trained top-2) and weak (rank 2 alone) routing are not mixed: one summary
    and one panel a branch, and the branches' loads add up to the trace's."""
    import moesteer
    from moesteer.analysis.usage import by_branch, usage_panels
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.scmoe import SCMoE

    lm = moesteer.load()
    (completion,) = lm.engine.generate(["Q: 5 * 6 - 4 = ?\n"], SCMoE(), SamplingParams(max_tokens=12), trace=True)
    experts = lm.engine.routing_sizes()[0]
    parts = by_branch(completion.trace)
    assert [name for name, _ in parts] == ["branch 0", "branch 1"]
    assert torch.equal(sum(p.expert_load(experts) for _, p in parts), completion.trace.expert_load(experts))
    actives = [{int(k) for r in p.records for k in (r.experts >= 0).sum(-1).flatten()} for _, p in parts]
    assert actives == [{2}, {1}]
    assert len(usage_panels("t", completion.trace, experts)) == 2
    result = CliRunner().invoke(
        main, ["inspect", "--strategy", "scmoe()", "Q: 5 * 6 = ?", "--out", str(tmp_path / "s.png")]
    )
    assert result.exit_code == 0 and "branch 0:" in result.stdout and "branch 1:" in result.stdout
