"""Multi-process runs on JAX's multi-controller runtime: one process per host, all running the same program.

Every process calls ``initialize`` first (before any other JAX call), then builds the same mesh over all devices
(``attrjax.training.data_mesh``). Each process feeds only its rows of every global batch (``process_rows``), reads
only its share of an evaluation split (``attrjax.data.eval_batches(..., shard=process_shard())``) and gathers
per-example results with ``gather_rows``. Files shared by all processes (datasets, run records, tables, figures)
are written by process 0 (``is_primary``), before the others read them (``primary_first``). In a single-process
run every function here is the identity or a no-op, so the same code serves a laptop and a TPU pod slice.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from attrjax._files import json_digest

# Environment variables that describe a multi-process run by hand (e.g. several GPU hosts without a cluster manager);
# the first is JAX's own.
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"

__all__ = ["MODES", "barrier", "check_same_everywhere", "detected_cluster", "gather_rows", "initialize", "is_primary",
           "primary_first", "process_shard"]

MODES = ("auto", "on", "off")
"""The values of ``initialize``'s ``mode``."""


def detected_cluster() -> str | None:
    """The cluster manager that launched this process as one of several, from its environment, or None.

    SLURM (``srun`` with more than one task), Open MPI (``mpirun -n`` > 1) and multi-host Cloud TPU (GKE or a TPU
    VM that lists its workers) are recognised; JAX's ``jax.distributed.initialize`` then finds the coordinator,
    the process count and this process's id itself.
    """
    def count(name: str) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() else 0

    if count("SLURM_NTASKS") > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    workers = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([worker for worker in workers.split(",") if worker]) > 1:
        return "tpu"
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "auto", timeout_s: int = 300) -> bool:
    """Joins this process to a multi-process run when there is one; returns whether there is.

    Call it before any other JAX call. ``mode``:
      ``"auto"`` (default): multi-process when a coordinator is given (here or in ``JAX_COORDINATOR_ADDRESS``) or
        a cluster manager launched several processes (``detected_cluster``); otherwise single-process, nothing done.
      ``"on"``: always ``jax.distributed.initialize``, with JAX's own detection of what is not given (e.g. a Cloud
        TPU VM's workers from its metadata server).
      ``"off"``: never.

    By hand (several GPU hosts, or CPU processes on one machine): give all three of ``coordinator_address``
    (``host:port`` of process 0, which listens there), ``num_processes`` and ``process_id``, as arguments or as
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. CPU processes exchange data through
    gloo collectives, which this selects.

    Raises:
      ValueError: an unknown ``mode``, a coordinator without the process count and id (no cluster detected), or an
        id outside 0 .. count - 1.
      RuntimeError: process 0 cannot listen on the coordinator's port, or another process cannot reach it within
        ``timeout_s`` (a wrong address or port, or process 0 not started). Processes that reach it but never all
        meet (mismatched process counts) are stopped by JAX's runtime after ``timeout_s``.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
    num_processes = num_processes if num_processes is not None else _env_int(NUM_PROCESSES_ENV)
    process_id = process_id if process_id is not None else _env_int(PROCESS_ID_ENV)
    cluster = detected_cluster()
    if mode == "off" or (mode == "auto" and coordinator_address is None and cluster is None):
        return False
    if jax.distributed.is_initialized():
        return True
    if cluster is None and coordinator_address is not None and None in (num_processes, process_id):
        raise ValueError(f"a multi-process run with coordinator {coordinator_address} needs the process count and "
                         f"this process's id too (--num_processes/--process_id, or {NUM_PROCESSES_ENV} and "
                         f"{PROCESS_ID_ENV}); no cluster manager (SLURM, Open MPI, Cloud TPU) was detected to "
                         "supply them")
    if num_processes is not None and (num_processes < 1 or process_id is not None
                                      and not 0 <= process_id < num_processes):
        raise ValueError(f"process id {process_id} of {num_processes} processes: the count must be >= 1 and the id "
                         f"in 0 .. {num_processes - 1}")
    if coordinator_address is not None and process_id is not None:
        # JAX's runtime aborts the whole process when it cannot reach the coordinator: check first, and say why.
        _check_coordinator(coordinator_address, process_id, num_processes, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backends only; GPUs and TPUs ignore it
    jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout_s)
    return True


def _check_coordinator(address: str, process_id: int, num_processes: int | None, timeout_s: float) -> None:
    """Raises ``RuntimeError`` if process 0 cannot listen on ``address``'s port, or another process cannot reach
    it within ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} is not host:port (e.g. 10.0.0.2:12345)")
    host = host.strip("[]")
    if process_id == 0:
        with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)) as probe:
            try:
                probe.bind(("", int(port)))
            except OSError as error:
                raise RuntimeError(f"process 0 cannot listen on port {port} of the coordinator address {address} "
                                   f"({error.strerror}); choose a free port") from error
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"process {process_id} of {num_processes} could not reach the coordinator at {address} within "
                    f"{timeout_s} s ({error.strerror or error}). Check that process 0 runs with the same address and "
                    "process count, and that the host and port are right and reachable from here") from error
            time.sleep(0.2)


def is_primary() -> bool:
    """Whether this is process 0, which writes the files all processes share and prints the progress."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op in a single-process run); ``name`` must be the same on all."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
    """Runs the block on process 0 first and on the others after it has finished, e.g. building a dataset that the
    others then only read, or writing a record that the others then check. Every process must enter it.

    Raises (on the other processes): ``RuntimeError`` if the block raised on process 0, which raises its own error.
    """
    if jax.process_count() == 1:
        yield
        return
    if is_primary():
        try:
            yield
        except BaseException:
            _tell_others(False)
            raise
        _tell_others(True)
    else:
        if not _tell_others(None):
            raise RuntimeError(f"process 0 failed while {name}; its error says why")
        yield


def _tell_others(succeeded: bool | None) -> bool:
    """Process 0's ``succeeded``, on every process (a collective that every process must reach)."""
    # An all-gather, read at process 0's row: jax 0.12's broadcast_one_to_all can hang on CPU (gloo) when it is the
    # first broadcast after an all-gather.
    everyone = multihost_utils.process_allgather(np.asarray([bool(succeeded)]))  # (processes, 1)
    return bool(np.asarray(everyone)[0, 0])


def check_same_everywhere(what: str, value: Any) -> None:
    """Raises ``ValueError`` on every process unless all processes hold the same JSON-compatible ``value`` (a
    config, a run record): processes that disagree would train different models into one checkpoint."""
    if jax.process_count() == 1:
        return
    digest = json_digest(value)
    mine = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 32)
    differing = [index for index, theirs in enumerate(everyone) if not np.array_equal(theirs, everyone[0])]
    if differing:
        raise ValueError(f"the processes disagree on the {what}: processes {differing} differ from process 0 "
                         f"(this is process {jax.process_index()}, {what} digest {digest[:16]}). Start every process "
                         "with the same command line, config and code version")


def process_shard() -> tuple[int, int]:
    """``(this process's index, the process count)``: the share of an evaluation split this process reads
    (``attrjax.data.eval_batches(..., shard=process_shard())``)."""
    return jax.process_index(), jax.process_count()


def gather_rows(tree):
    """Every process's arrays (a pytree of host arrays with a leading row axis, the same shapes on every process)
    concatenated along that axis in process order: the whole split's rows from each process's share. The identity
    in a single-process run."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
