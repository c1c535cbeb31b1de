"""attrjax._progress: the time-left estimate against hand-computed paces, the bar on a (fake) terminal with printed
lines kept whole above it, and plain lines everywhere else."""

import io
import sys

import pytest

from attrjax import _progress as progress_lib
from attrjax._progress import Progress, format_duration, track


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def fake_clock(monkeypatch, times):
    clock = iter(times)
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: next(clock))


def test_the_first_item_that_did_work_is_left_out_of_the_pace(monkeypatch):
    # Created at 0; items end at 30 (compilation), 32, 32.5 (read back from disk), 34, 36.
    fake_clock(monkeypatch, [0.0, 30.0, 32.0, 32.5, 34.0, 36.0])
    progress = Progress(6, bar=False)
    assert progress.step() == "1/6, about 2m30s left"  # one item timed: its 30 s is the only pace there is
    assert progress.step() == "2/6, about 8s left"  # 2 s a step from then on
    assert progress.step(timed=False) == "3/6, about 6s left"  # cost nothing: the pace stays 2 s
    assert progress.seconds_per_item() == pytest.approx(2.0)
    assert progress.step() == "4/6, about 4s left"  # (2 + 1.5) / 2 = 1.75 s -> 3.5 s, rounded to 4
    assert progress.seconds_per_item() == pytest.approx(1.75)
    assert progress.step(2) == "6/6"  # done: no estimate


def test_nothing_timed_gives_no_estimate_and_a_resumed_run_counts_from_where_it_was(monkeypatch):
    fake_clock(monkeypatch, [0.0, 1.0, 5.0, 9.0])
    assert Progress(2, bar=False).step(timed=False) == "1/2"
    resumed = Progress(100, initial=90, bar=False)
    assert resumed.status() == "90/100"
    assert resumed.step() == "91/100, about 36s left"  # 4 s for this process's first step, 9 to go


@pytest.mark.parametrize("total, initial", [(-1, 0), (3, 4), (3, -1)])
def test_bad_counts_are_refused(total, initial):
    with pytest.raises(ValueError, match="initial"):
        Progress(total, initial=initial, bar=False)


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (7.4, 75, 3700, -3)] == ["7s", "1m15s", "1h01m", "0s"]


def test_a_terminal_gets_a_bar_and_printed_lines_go_above_it_whole(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", terminal)
    with Progress(4, description="[teacher] step", unit="step") as progress:
        assert progress.has_bar and sys.stdout is not terminal
        for _ in range(4):
            progress.step()
            print("loss", end=" ")  # half a line: held back until the line ends
            print("0.5")
    assert sys.stdout is terminal  # restored when the bar closes
    text = terminal.getvalue()
    assert "[teacher] step" in text and "4/4" in text and "step/s" in text and " left" in text
    # Every printed line reached the terminal in one piece, at the start of a line once the bar was cleared.
    assert text.count("\rloss 0.5\n") == 4 and text.count("loss") == 4


def test_logs_and_ci_get_a_plain_line_every_few_seconds_and_one_at_the_end(monkeypatch):
    # Each item takes 3 s (two clock reads per item, one by the Progress, one by track).
    fake_clock(monkeypatch, [0.0, 0.0] + [t for n in range(1, 9) for t in (3.0 * n, 3.0 * n)])
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    lines = []
    assert list(track(range(8), 8, description="rendering train", every_s=10, log=lines.append)) == list(range(8))
    assert sys.stderr.getvalue() == ""  # no bar
    assert lines == ["rendering train 4/8, about 12s left", "rendering train 8/8"]  # at 12 s, then done at 24 s
