"""Training streams through grain: batch ``step`` is a pure function of the step, built ahead on threads and, with
``workers``, in worker processes.

A stream is a ``grain.MapDataset`` over step numbers mapped by a ``BatchFn`` (a picklable callable ``step -> batch``),
so a run resumed at step ``s`` builds exactly the batches an uninterrupted one would: the step in the checkpoint is
the whole iterator state. grain reads ahead: ``threads`` batches are built at once in each process (JPEG decoding
and PIL resizing release the GIL), and ``workers`` > 0 moves that work into worker processes, in order.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import grain
import numpy as np
from absl import flags

BatchFn = Callable[[int], dict]  # step -> batch (a dict of arrays); picklable to run in worker processes
_ENDLESS = 2**62  # steps in a stream without an end: the trainer stops asking long before


def default_threads() -> int:
    """Batches built at once per process: one per core, at most 16."""
    return min(16, os.cpu_count() or 1)


def check_loader_options(workers: int, threads: int | None) -> None:
    """Raises unless ``workers`` is an int >= 0 and ``threads`` None or an int >= 1."""
    for name, value, minimum in (("workers", workers, 0), ("threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < minimum):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def step_stream(batch_fn: BatchFn, start_step: int, num_steps: int | None = None, *, workers: int = 0,
                threads: int | None = None, finish: Callable[[dict], dict] | None = None) -> Iterator[dict]:
    """``finish(batch_fn(start_step)), finish(batch_fn(start_step + 1)), ...``: ``num_steps`` of them, or without
    end.

    Args:
      workers: worker processes building batches (0: this process).
      threads: batches built at once in each process (default ``default_threads()``); as many are held ready.
      finish: applied to each batch where it is consumed: on the read-ahead threads without workers, after the
        transfer from a worker with them (e.g. normalising uint8 images, so workers send 4x fewer bytes).
    """
    check_loader_options(workers, threads)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    threads = threads or default_threads()
    stop = start_step + (_ENDLESS if num_steps is None else num_steps)
    dataset = grain.MapDataset.range(start_step, stop).map(batch_fn)
    if finish is not None and not workers:
        dataset = dataset.map(finish)
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    if workers:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads its absl flags when it starts workers and fails where no one parsed them
            # (google/grain#1355): their defaults are what we want.
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1))
        if finish is not None:
            stream = stream.map(finish)
    return iter(stream)
