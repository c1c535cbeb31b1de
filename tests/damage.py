"""Damage done to built dataset files in the tests, and following the advice of the error that reports it."""

import pathlib
import re
import shlex
import shutil
from typing import Callable


def truncate_to_half(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def scramble_records(path: pathlib.Path) -> None:
    """Zeroes bytes of the first record chunk (after the 64-byte file signature), keeping the footer: the chunk's
    hash no longer matches."""
    data = bytearray(path.read_bytes())
    data[100:1100] = bytes(1000)
    path.write_bytes(bytes(data))


def follow_the_advice(message: str, module: str, main: Callable[[list[str]], None]) -> None:
    """Deletes the folder that `message` says to delete, if any, and runs the `python -m module ...` it names."""
    deleted = re.search(r"delete (\S+) and", message)
    if deleted:
        shutil.rmtree(deleted.group(1))
    command = shlex.split(message.split("`")[1])
    assert command[:3] == ["python", "-m", module], message
    main(command[3:])
