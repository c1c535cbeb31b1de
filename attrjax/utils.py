"""Utilities the experiment modules use and user scripts may too: one writer per work directory, atomic JSON
files, progress lines, names of pytree paths and memory-bounded maps over a batch."""

from attrjax._chunking import chunked_map
from attrjax._files import json_digest, write_bytes, write_json
from attrjax._locking import LOCK_FILE, DirectoryInUseError, exclusive_directory
from attrjax._paths import path_name
from attrjax._progress import Progress, format_duration, track

__all__ = ["LOCK_FILE", "DirectoryInUseError", "Progress", "chunked_map", "exclusive_directory", "format_duration",
           "json_digest", "path_name", "track", "write_bytes", "write_json"]
