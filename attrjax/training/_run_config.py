"""Binds a checkpoint directory to the configuration that wrote it, so a rerun with other settings never resumes
(or reports) a run that was made with different ones.

The first run writes ``run_config.json`` (the resolved settings and their SHA-256 digest) into the directory. A
later run with the same settings resumes; one whose settings differ is refused with the differing keys, unless it
asks for ``on_config_change="restart"``: then the old directory is kept under ``<directory>.replaced-<digest>`` and
the run starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping

from attrjax._files import json_compatible, json_digest, write_json
from attrjax._locking import LOCK_FILE

RUN_CONFIG_FILE = "run_config.json"
ON_CONFIG_CHANGE = ("refuse", "restart")


class RunConfigMismatchError(ValueError):
    """A directory was written by other settings than the ones given."""


def config_digest(run_config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``run_config``: equal settings give equal digests."""
    return json_digest(dict(run_config))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {key: value for name, item in tree.items()
                for key, value in _flatten(item, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs (``<absent>`` where a side lacks it)."""
    old_flat, new_flat = _flatten(json_compatible(dict(old))), _flatten(json_compatible(dict(new)))
    absent = "<absent>"
    changed = [key for key in sorted(old_flat.keys() | new_flat.keys())
               if old_flat.get(key, absent) != new_flat.get(key, absent)]
    return [f"{key}: {json.dumps(old_flat.get(key, absent))} -> {json.dumps(new_flat.get(key, absent))}"
            for key in changed]


def read_run_config(directory: str) -> dict | None:
    """The record ``{"digest", "config"}`` of ``directory``, or None if it has none."""
    path = os.path.join(directory, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or not {"digest", "config"} <= record.keys():
            raise ValueError("not a run record")
    except ValueError as error:
        raise RunConfigMismatchError(f"{path} is damaged ({error}); it records which settings wrote the checkpoints "
                                     f"beside it. Move {directory} away and rerun") from error
    return record


def _mismatch_message(directory: str, record: dict | None, run_config: Mapping[str, Any]) -> str:
    if record is None:
        what = ("holds checkpoints but no record of the settings that wrote them (written by another program or an "
                "older attrjax), so resuming could mix two configurations")
    else:
        differences = config_differences(record["config"], run_config)
        what = (f"was written with other settings ({len(differences)} differ):\n  " + "\n  ".join(differences[:12])
                + (f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""))
    return (f"{directory} {what}\nChoose one: a new work directory for the new settings; the settings that wrote it "
            "(to resume or evaluate that run); or on_config_change='restart' to set this run aside (kept as "
            f"{os.path.basename(directory)}.replaced-<digest>) and train it again with the new settings")


def _has_content(directory: str) -> bool:
    return os.path.isdir(directory) and any(name not in (RUN_CONFIG_FILE, LOCK_FILE) for name in os.listdir(directory))


def check_run_config(directory: str, run_config: Mapping[str, Any]) -> None:
    """Raises ``RunConfigMismatchError`` unless ``directory``'s record equals ``run_config`` (read-only: for
    restoring a finished run to evaluate it)."""
    record = read_run_config(directory)
    if record is None or record["digest"] != config_digest(run_config):
        raise RunConfigMismatchError(_mismatch_message(directory, record, run_config))


def _set_aside(directory: str, digest: str) -> str:
    target, copy = f"{directory}.replaced-{digest[:8]}", 1
    while os.path.exists(target):
        copy += 1
        target = f"{directory}.replaced-{digest[:8]}-{copy}"
    shutil.move(directory, target)
    return target


def check_on_config_change(on_config_change: str) -> None:
    """Raises ValueError unless ``on_config_change`` is one of ``ON_CONFIG_CHANGE``."""
    if on_config_change not in ON_CONFIG_CHANGE:
        raise ValueError(f"on_config_change must be one of {ON_CONFIG_CHANGE}, got {on_config_change!r}")


def bind_run_config(directory: str, run_config: Mapping[str, Any], *, on_config_change: str = "refuse",
                    log: Callable[[str], None] = print) -> None:
    """Makes ``directory`` a directory of ``run_config``'s run before anything is restored from or saved to it.

    New or empty directory: writes the record. Same settings: nothing to do. Other settings (or checkpoints without
    a record): raises ``RunConfigMismatchError`` naming the differing keys, or with ``on_config_change="restart"``
    moves the directory to ``<directory>.replaced-<digest>`` and starts a fresh one.
    """
    check_on_config_change(on_config_change)
    digest = config_digest(run_config)
    record = read_run_config(directory)
    if record is not None and record["digest"] == digest:
        return
    if record is not None or _has_content(directory):
        if on_config_change == "refuse":
            raise RunConfigMismatchError(_mismatch_message(directory, record, run_config))
        target = _set_aside(directory, record["digest"] if record else "unrecorded")
        log(f"settings changed: {directory} moved to {target}; training afresh")
    write_json(os.path.join(directory, RUN_CONFIG_FILE), {"digest": digest, "config": dict(run_config)})
