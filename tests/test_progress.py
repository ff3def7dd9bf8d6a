"""The final results table and quiet mode."""

from __future__ import annotations

import io

from rich.console import Console

from alrun.progress import Reporter

ROW = {
    "round": 0,
    "images": 10,
    "boxes": 31,
    "cost_s": 790.5,
    "mAP": 0.25,
    "mAP50": 0.5,
    "mAR": 0.4,
    "train_s": 1.5,
}


def test_table_lists_every_round():
    out = io.StringIO()
    reporter = Reporter(console=Console(file=out, force_terminal=True, width=120))
    reporter.table([ROW, {**ROW, "round": 1, "images": 20, "mAP50": 0.625}], title="entropy")
    text = out.getvalue()
    assert "entropy" in text and "0.625" in text and "790" in text


def test_progress_bar_and_quiet_mode():
    out = io.StringIO()
    reporter = Reporter(console=Console(file=out, force_terminal=True, width=120))
    with reporter.task("round 1/4 train") as progress:
        for i in range(3):
            progress(i + 1, 3)
    assert "round 1/4 train" in out.getvalue()
    quiet_out = io.StringIO()
    quiet = Reporter(quiet=True, console=Console(file=quiet_out, force_terminal=True))
    with quiet.task("x") as progress:
        progress(1, 1)
    quiet.table([ROW], title="t")
    assert quiet_out.getvalue() == ""
