"""Files that are either whole or absent: bytes and JSON written atomically, JSON valid by the standard (no bare
NaN)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Any


def json_compatible(value: Any) -> Any:
    """``value`` with tuples as lists, NumPy scalars and arrays as Python values, and non-finite floats as ``None``
    (JSON has no NaN; ``null`` keeps the file readable by every parser)."""
    if isinstance(value, dict):
        return {str(key): json_compatible(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_compatible(item) for item in value]
    if hasattr(value, "tolist"):  # NumPy / JAX scalars and arrays
        return json_compatible(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as JSON")


def json_digest(value: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``value`` (``json_compatible``, keys sorted): equal values, equal
    digests."""
    text = json.dumps(json_compatible(value), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (a temporary file in the same directory, flushed to disk, then renamed
    over ``path``): readers see the old file or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=directory, prefix=".tmp-", delete=False) as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    os.chmod(f.name, 0o644)  # temporary files are created private
    os.replace(f.name, path)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes ``payload`` as JSON to ``path`` atomically (``write_bytes``)."""
    text = json.dumps(json_compatible(payload), indent=2, sort_keys=True, allow_nan=False)
    write_bytes(path, (text + "\n").encode())
