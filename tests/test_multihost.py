"""Several JAX CPU processes on 127.0.0.1 (gloo collectives) train as one: two processes x 2 devices end where one
process on one device (the test's own) does and resume after both are killed; the cross-process checks see real
disagreements."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from attrjax import distributed
from tests import multihost_child
from tests.summaries import assert_summaries_close

CHILD = os.path.join(os.path.dirname(__file__), "multihost_child.py")
TIMEOUT_S = 180


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(workdir, num_processes: int, devices: int, num_steps: int, *kill_step) -> list[subprocess.CompletedProcess]:
    """Starts the processes of one run and waits for all of them; every one is killed if the run overruns."""
    port = _free_port()
    commands = [[sys.executable, CHILD, str(workdir), str(num_processes), str(process_id), str(port), str(devices),
                 str(num_steps), *map(str, kill_step)] for process_id in range(num_processes)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for command in commands]
    try:
        outputs = [child.communicate(timeout=TIMEOUT_S) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    return [subprocess.CompletedProcess(command, child.returncode, out, err)
            for command, child, (out, err) in zip(commands, children, outputs)]


def _final(workdir) -> dict:
    with np.load(os.path.join(workdir, "final.npz")) as final:
        return dict(final)


@pytest.mark.oldest
def test_two_processes_train_as_one_and_resume_after_both_are_killed(tmp_path):
    assert jax.device_count() == 1
    multihost_child.main(str(tmp_path / "single"), 4)  # the reference: one process (this one), one device
    killed = _run(tmp_path / "multi", 2, 2, 4, 3)
    # Each process SIGKILLs itself before step 3. The one that gets there second may be aborted first (SIGABRT) by
    # JAX's distributed runtime, which ends a process whose peer has vanished: either way both die hard, mid-run.
    codes = [process.returncode for process in killed]
    assert set(codes) <= {-signal.SIGKILL, -signal.SIGABRT} and -signal.SIGKILL in codes, codes
    for process_id, process in enumerate(killed):  # the cross-process checks, before training starts
        assert "check: the processes disagree on the probe value: processes [1] differ from process 0" in process.stdout
        assert ("process 0 raised its own error" if process_id == 0
                else "process 0 failed while probing; its error says why") in process.stdout
        assert "gathered [0, 0, 1, 1]" in process.stdout
        assert "batch size 6 is not divisible by the 4 devices of the mesh (2 processes)" in process.stdout
    resumed = _run(tmp_path / "multi", 2, 2, 4)
    assert [process.returncode for process in resumed] == [0, 0], resumed[0].stderr + resumed[1].stderr
    assert "process 0: rows 0:4 of 8" in resumed[0].stdout and "process 1: rows 4:8 of 8" in resumed[1].stdout
    assert "resuming from the checkpoint of step" in resumed[0].stdout
    assert "[train]" not in resumed[1].stdout  # process 0 logs
    # One device computes the step of 4 devices in 2 processes: only the order of the gradient sums differs (one
    # device's, XLA's across devices, gloo's across processes), so the weights agree to float32 rounding.
    chex.assert_trees_all_close(_final(tmp_path / "multi"), _final(tmp_path / "single"), atol=1e-5, rtol=1e-5)
    # The evaluation, split over the processes (and within each over its two devices) and gathered, scores every
    # image once: the same as one process on one device.
    single_eval, multi_eval = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("single", "multi"))
    assert single_eval["num_images"] == 11 and single_eval["num_counted"] > 0
    assert_summaries_close(multi_eval, single_eval, rtol=1e-6, auc_rtol=1e-4)


def test_a_coordinator_that_is_incomplete_unreachable_or_taken_is_refused(monkeypatch):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES",
                 distributed.NUM_PROCESSES_ENV, distributed.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs the process count and this process's id"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"process id 2 of 2 processes: .* in 0 \.\. 1"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        distributed.initialize(mode="always")
    assert distributed.initialize() is False  # nothing configured: a single-process run
    with pytest.raises(RuntimeError, match=r"process 1 of 2 could not reach the coordinator at 127\.0\.0\.1:\d+ "
                                           "within 1 s"):
        distributed.initialize(f"127.0.0.1:{_free_port()}", 2, 1, timeout_s=1)  # process 0 never started
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="process 0 cannot listen on port"):
            distributed.initialize(f"127.0.0.1:{taken.getsockname()[1]}", 2, 0, timeout_s=1)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert distributed.detected_cluster() == "slurm"
