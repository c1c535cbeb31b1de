"""One writer per directory: a lock that a second process is refused with the holder's name, and that a crashed
holder never leaves behind.

    with exclusive_directory("runs/demo"):
        ...  # train, evaluate, write results

The lock is the operating system's (``flock`` on ``<directory>/.attrjax.lock``): the kernel releases it when the
holding process ends, however it ends, so a stale lock needs no recovery step. The file itself stays and records the
last holder (pid, host, command, since when) for the message a refused process prints. On a network file system the
lock holds across hosts only where the file system supports ``flock`` (NFSv4, Lustre with ``flock`` mounted);
elsewhere it protects against writers on the same host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

LOCK_FILE = ".attrjax.lock"
"""The lock file ``exclusive_directory`` creates in the directory it locks; it records the last holder."""


class DirectoryInUseError(RuntimeError):
    """Another process holds the directory's lock."""


def _holder(fd: int) -> str:
    """The holder a lock file records, as words (``pid 123 on host, since ..., running ...``)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        record = {}
    if not record:
        return "another process"
    return (f"pid {record.get('pid')} on {record.get('host')} (since {record.get('since')}, running "
            f"`{record.get('command')}`)")


@contextlib.contextmanager
def exclusive_directory(directory: str | os.PathLike) -> Iterator[None]:
    """Holds ``directory``'s lock (creating the directory) for the duration of the ``with`` block.

    Raises:
      DirectoryInUseError: another process holds it; the message names that process and what to do.
    """
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryInUseError(
                f"{directory} is in use by {_holder(fd)}: one process writes a work directory at a time. Wait for "
                "it to finish (or stop it), or give this run another directory") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
