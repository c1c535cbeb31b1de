"""One writer per work directory: a second writer is refused with the holder's name, and a killed holder leaves no
lock behind."""

import os
import signal
import subprocess
import sys

import pytest

from attrjax._locking import LOCK_FILE, DirectoryInUseError, exclusive_directory
from experiments import demo


def test_a_second_writer_is_refused_naming_the_holder_and_gets_it_once_released(tmp_path):
    with exclusive_directory(tmp_path):
        with pytest.raises(DirectoryInUseError, match=rf"in use by pid {os.getpid()} on .*running `"):
            with exclusive_directory(tmp_path):
                pass
    with exclusive_directory(tmp_path):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, sys\nfrom attrjax._locking import exclusive_directory\n"
         f"with exclusive_directory({str(tmp_path)!r}):\n    print('held', flush=True)\n    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(DirectoryInUseError, match=f"pid {holder.pid} "):
        with exclusive_directory(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive_directory(tmp_path):  # the kernel released the dead process's lock
        assert str(os.getpid()) in (tmp_path / LOCK_FILE).read_text()


def test_an_experiment_on_a_directory_in_use_exits_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["demo", "--workdir", str(tmp_path)])
    monkeypatch.setattr(demo, "run", lambda config, workdir: pytest.fail("ran on a directory in use"))
    with exclusive_directory(tmp_path):
        with pytest.raises(SystemExit, match=rf"^error: {tmp_path} is in use by pid {os.getpid()}"):
            demo.main()
