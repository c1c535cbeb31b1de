"""Curves people can look at: every logged scalar of a run as TensorBoard event files and as a CSV of the same
numbers, in one directory per run.

    writer = MetricWriter("runs/demo/kd_match/metrics")   # events.out.tfevents.* and metrics.csv
    writer.write(100, {"loss": 0.31, "learning_rate": 2e-3})
    writer.close()
    read_events("runs/demo/kd_match/metrics")   # {"loss": [(100, 0.31)], "learning_rate": [(100, 0.002)]}

``tensorboard --logdir runs/demo`` shows every run of a work directory side by side. ``metrics.csv`` has one row per
(step, name, value). A resumed run appends to both (TensorBoard starts a new event file). A run killed after its last
checkpoint logged steps it replays when it resumes: ``resume_from(step)`` (``attrjax.training.train`` calls it) drops
those rows from the CSV and starts the new event file with TensorBoard's purge marker, which hides the earlier
events of those steps, so every step appears once in both.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import struct
from typing import Mapping, Protocol

from attrjax._files import write_bytes

CSV_NAME = "metrics.csv"


class ScalarWriter(Protocol):
    """What ``attrjax.training.train`` logs to: anything with this ``write`` (``MetricWriter``, clu's writers, ...).

    A writer that also has ``resume_from(step)`` is told, when a run resumes from the checkpoint of ``step``, that
    the steps after it will be logged again (``MetricWriter`` then forgets what it had of them)."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """One value per name at ``step``."""


class MetricWriter:
    """Writes scalars to TensorBoard event files and ``metrics.csv`` in ``directory``.

    Args:
      directory: created if needed.
      step_offset: added to every step (the rounds of iterative pruning write one continuous curve).
    """

    def __init__(self, directory: str, *, step_offset: int = 0):
        from tensorboardX import SummaryWriter  # (imported here: a run without curves does not need it)

        os.makedirs(directory, exist_ok=True)
        self.directory, self.step_offset = directory, step_offset
        self._summary_writer = SummaryWriter
        # Opened at the first write: a run that logs nothing leaves no empty event file.
        self._events: SummaryWriter | None = None
        self._purge_step: int | None = None
        self._csv_path = os.path.join(directory, CSV_NAME)
        # Empty too when a run was killed between creating the file and its first flush: the header goes first.
        new = not os.path.exists(self._csv_path) or os.path.getsize(self._csv_path) == 0
        self._csv_file = open(self._csv_path, "a", newline="")
        self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(["step", "name", "value"])
            self._csv_file.flush()

    def resume_from(self, step: int) -> None:
        """Forgets every value logged after ``step`` (+ the offset): the run resumes from that step's checkpoint and
        logs the steps after it again. Call it before the first ``write``."""
        if self._events is not None:
            raise RuntimeError("resume_from must come before the first write")
        step = int(step) + self.step_offset
        self._csv_file.close()
        _drop_csv_rows_after(self._csv_path, step)
        self._csv_file = open(self._csv_path, "a", newline="")
        self._csv = csv.writer(self._csv_file)
        self._purge_step = step + 1

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """One value per name at ``step`` (+ the offset); names may contain ``/`` (TensorBoard groups by them)."""
        if self._events is None:
            # Event files are named by the second they were opened in: a count keeps a second one of the same
            # second (a resume, an evaluation right after training) from replacing the first, and sorts after it.
            count = len(glob.glob(os.path.join(self.directory, "events.out.tfevents.*")))
            self._events = self._summary_writer(self.directory, flush_secs=30, purge_step=self._purge_step,
                                                filename_suffix=f".{count:04d}")
        step = int(step) + self.step_offset
        for name, value in scalars.items():
            self._events.add_scalar(name, float(value), step)
            self._csv.writerow([step, name, repr(float(value))])
        self._csv_file.flush()

    def close(self) -> None:
        """Flushes and closes both files."""
        if self._events is not None:
            self._events.close()
        self._csv_file.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise  # else the error on its way out says what went wrong; a failed flush (a full disk) is its echo


def _drop_csv_rows_after(path: str, step: int) -> None:
    """Rewrites the CSV at ``path`` (atomically) without its rows of steps after ``step``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if int(row[0]) <= step]
    if len(kept) == len(rows):
        return
    text = io.StringIO(newline="")
    csv.writer(text).writerows(kept)
    write_bytes(path, text.getvalue().encode())


def _masked_crc32c(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: str):
    """The records of a TFRecord file (length, its CRC, data, its CRC), checking both CRCs."""
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                raise ValueError(f"{path} ends in a truncated record")
            length, length_crc = struct.unpack("<QI", header)
            data, (data_crc,) = f.read(length), struct.unpack("<I", f.read(4))
            if _masked_crc32c(header[:8]) != length_crc or _masked_crc32c(data) != data_crc:
                raise ValueError(f"{path} holds a corrupt record (CRC mismatch)")
            yield data


def read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``directory``: ``{name: [(step, value), ...]}`` by step, as
    TensorBoard shows them: a purge marker (a resumed run's ``SessionLog.START`` at step S) hides the earlier files'
    values of steps >= S, and the last value written wins for a repeated step. Reads the files directly;
    TensorBoard is not needed."""
    from tensorboardX.proto import event_pb2

    paths = sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
    if not paths:
        raise FileNotFoundError(f"{directory} holds no TensorBoard event files")
    scalars: dict[str, dict[int, float]] = {}
    for path in paths:
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for by_step in scalars.values():
                    for step in [step for step in by_step if step >= event.step]:
                        del by_step[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
    return {name: sorted(by_step.items()) for name, by_step in scalars.items()}
