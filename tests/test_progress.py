"""Progress bars: a few lines in all when stderr is not a terminal (a log, CI)."""

from __future__ import annotations

from moesteer.progress import STEPS, progress


def test_a_bar_writes_a_line_every_tenth_when_stderr_is_not_a_terminal(capsys):
    bar = progress(total=200, initial=7, desc="eval", unit="problem")
    for _ in range(193):
        bar.set_postfix(acc="0.500")  # drawn with the next update, not as a line of its own
        bar.update(1)
    bar.close()
    for _ in progress(range(37), desc="routing", unit="reference"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    evals, routing = [x for x in lines if x.startswith("eval:")], [x for x in lines if x.startswith("routing:")]
    assert len(evals) <= STEPS + 2 and len(routing) <= STEPS + 2
    assert "7/200" in evals[0] and "200/200" in evals[-1] and "acc=0.500" in evals[-1]
    assert "37/37" in routing[-1]
