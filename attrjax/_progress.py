"""Progress of long loops: done / total, rate and time left, as a live bar on a terminal and as plain lines in
logs and CI.

One estimator serves both: the time left is the remaining count times the mean time of the items that did work,
leaving out the first of them when there are others (it holds the compilation), so neither the bar nor the lines
are thrown off by a slow first step or by items read back from disk.

    with Progress(num_steps, description="[teacher] step", unit="step") as progress:
        for step in range(num_steps):
            ...
            progress.step()
            if step % 50 == 0:
                print(f"[teacher] step {step}: loss ... ({progress.status()})")
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

import tqdm

Item = TypeVar("Item")
_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}{postfix}]"  # the postfix: rate, time left


def format_duration(seconds: float) -> str:
    """``75.0`` -> ``"1m15s"``; ``3700`` -> ``"1h01m"``."""
    seconds = max(0, round(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def on_terminal() -> bool:
    """Whether stderr, where the bar is drawn, is an interactive terminal (not a log file, a pipe or CI)."""
    return _is_terminal(sys.stderr)


class _AboveTheBars(io.TextIOBase):
    """``sys.stdout`` while bars are drawn on the same terminal: every printed line goes above the bars instead of
    through them (whole lines only, since a bar redrawn after half a line would overwrite it)."""

    def __init__(self, stream: TextIO):
        self.stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        if lines:
            with tqdm.tqdm.external_write_mode(file=self.stream):
                self.stream.write("".join(line + "\n" for line in lines))
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return _is_terminal(self.stream)


class Progress:
    """``done/total`` of a loop with its rate and the time left.

    Args:
      total: the number of items the loop runs.
      description: what the items are, the bar's label (``"[teacher] step"``).
      unit: one item, for the rate (``"step"`` gives ``"3.2 step/s"``).
      initial: items done before this process started (a resumed run): they count in done / total, not in the pace.
      bar: draw a live bar on stderr; default: when stderr is a terminal. Without one, ``status()`` is for the
        caller's own lines. While a bar is drawn on a terminal, what is printed to it goes above the bar.
    """

    def __init__(self, total: int, *, description: str = "", unit: str = "item", initial: int = 0,
                 bar: bool | None = None):
        if total < 0 or not 0 <= initial <= total:
            raise ValueError(f"Progress needs 0 <= initial <= total, got initial={initial}, total={total}")
        self.total, self.done, self.unit = total, initial, unit
        self._timed, self._first_seconds, self._later_seconds = 0, 0.0, 0.0
        self._last = time.perf_counter()
        self._bar, self._stdout = None, contextlib.ExitStack()
        if on_terminal() if bar is None else bar:
            self._bar = tqdm.tqdm(total=total, initial=initial, desc=description, unit=unit, leave=False,
                                  dynamic_ncols=True, bar_format=_BAR_FORMAT)
            if _is_terminal(sys.stdout) and not isinstance(sys.stdout, _AboveTheBars):  # the outermost bar's
                self._stdout.enter_context(contextlib.redirect_stdout(_AboveTheBars(sys.stdout)))

    def step(self, count: int = 1, *, timed: bool = True) -> str:
        """Counts ``count`` items done since the last call; ``timed=False`` for items that cost no real work (read
        back from disk), which then do not speed up the estimate. Returns ``status()``."""
        now = time.perf_counter()
        self.done = min(self.total, self.done + count)
        if timed:
            if self._timed:
                self._later_seconds += now - self._last
            else:
                self._first_seconds = now - self._last
            self._timed += count
        self._last = now
        if self._bar is not None:
            self._bar.set_postfix_str(self._pace_and_time_left(), refresh=False)
            self._bar.update(count)
        return self.status()

    def seconds_per_item(self) -> float | None:
        """The mean time of the items that did work, the first left out when there are others; None before any."""
        if not self._timed:
            return None
        if self._timed == 1 or self._later_seconds == 0:
            return self._first_seconds / self._timed
        return self._later_seconds / (self._timed - 1)

    def status(self) -> str:
        """``"12/100, about 28s left"`` (``"100/100"`` when done, ``"3/100"`` before anything was timed)."""
        pace = self.seconds_per_item()
        if self.done >= self.total or pace is None:
            return f"{self.done}/{self.total}"
        return f"{self.done}/{self.total}, about {format_duration(pace * (self.total - self.done))} left"

    def _pace_and_time_left(self) -> str:
        pace = self.seconds_per_item()
        if pace is None:
            return ""
        rate = f"{1 / pace:.2f} {self.unit}/s" if pace < 1 else f"{pace:.1f} s/{self.unit}"
        return f"{rate}, {format_duration(pace * (self.total - self.done))} left"

    @property
    def has_bar(self) -> bool:
        """Whether a live bar is drawn (else the caller's lines are the only display)."""
        return self._bar is not None

    def close(self) -> None:
        """Removes the bar (the plain lines stay)."""
        if self._bar is not None:
            self._stdout.close()
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def track(items: Iterable[Item], total: int, *, description: str, unit: str = "item", every_s: float = 10.0,
          log: Callable[[str], None] = print) -> Iterator[Item]:
    """Yields ``items`` while showing their progress: a bar on a terminal, else a plain line
    (``"<description> 512/2048, about 10s left"``) at most every ``every_s`` seconds and one at the end."""
    with Progress(total, description=description, unit=unit) as progress:
        last_line = time.perf_counter()
        for item in items:
            yield item
            status = progress.step()
            now = time.perf_counter()
            if not progress.has_bar and (now - last_line >= every_s or progress.done == total):
                log(f"{description} {status}")
                last_line = now
