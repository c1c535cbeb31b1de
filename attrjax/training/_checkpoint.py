"""Orbax checkpoints of the whole ``TrainState`` (params, BatchNorm statistics, optimizer state, step) that cannot
lie: nothing non-finite is saved, every array is verified on restore, and a damaged checkpoint is set aside for the
newest intact one.

Each checkpoint step holds two items: ``state`` (the arrays, written by orbax) and ``manifest`` (JSON: for every
leaf of the state its path, shape, dtype and CRC-32 of its bytes). orbax does not verify the data it reads back, so a
flipped byte would otherwise resume silently with changed weights.
"""

from __future__ import annotations

import os
import shutil
import time
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from attrjax.distributed import is_primary, primary_first
from attrjax.training._sharding import host_value

STATE, MANIFEST = "state", "manifest"


class NonFiniteStateError(FloatingPointError):
    """Raised instead of saving a state that holds NaN or inf."""


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files are missing, unreadable or do not match their manifest."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (permissions, a full disk, a vanished directory); the older ones are
    intact."""


def check_step_count(name: str, value) -> None:
    """Raises ValueError unless ``value`` is a positive integer number of steps (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive number of steps, got {value!r}")


def checkpoint_manager(directory: str, *, save_every: int, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A manager that saves every ``save_every`` steps (and on ``force=True``) and keeps the newest few.

    Saves are synchronous: a save that fails (an unwritable directory, a full disk) raises at once in the training
    loop, where asynchronous saves left orbax's background threads waiting minutes for a step directory that never
    came. The demo's and the paper's states save in well under a second.

    Close it (``manager.close()``) on every exit path: an open manager prints orbax's errors at interpreter exit.
    """
    check_step_count("save_every", save_every)
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=max_to_keep,
                                           enable_async_checkpointing=False)
    handlers = {STATE: ocp.StandardCheckpointHandler(), MANIFEST: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _paths_and_leaves(tree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _layout(tree) -> dict[str, dict[str, Any]]:
    """``{path: {shape, dtype}}`` of every leaf of ``tree`` (arrays or shape-dtype structs; nothing is read)."""
    return {path: {"shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype))}
            for path, leaf in _paths_and_leaves(tree)}


def manifest(host_state) -> dict[str, dict[str, Any]]:
    """``{path: {shape, dtype, crc32}}`` of every leaf of ``host_state`` (a pytree of host NumPy arrays)."""
    entries = _layout(host_state)
    for path, value in _paths_and_leaves(host_state):
        entries[path]["crc32"] = zlib.crc32(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
    return entries


def non_finite_leaves(host_state) -> list[str]:
    """Paths of the floating-point leaves of ``host_state`` (host NumPy arrays) that hold a NaN or an inf."""
    return [path for path, value in _paths_and_leaves(host_state)
            if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value))]


def save(manager: ocp.CheckpointManager, state, *, step: int | None = None, force: bool = False) -> bool:
    """Saves ``state`` as ``step`` when the manager's interval (or ``force``) says so; returns whether it saved.

    Pass the host's step counter where you have it: reading ``state.step`` waits for the device to finish the step.

    Raises:
      NonFiniteStateError: ``state`` holds NaN or inf; nothing is written, so the newest checkpoint stays the last
        finite one.
      CheckpointWriteError: the files could not be written; it names the cause and the newest intact checkpoint.
    """
    step = int(state.step) if step is None else step
    if not (force or manager.should_save(step)):
        return False
    host_state = jax.tree.map(host_value, state)
    bad = non_finite_leaves(host_state)
    if bad:
        raise NonFiniteStateError(f"refusing to checkpoint step {step}: {len(bad)} state arrays hold NaN or inf "
                                  f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    newest = manager.latest_step()
    try:
        manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                      MANIFEST: ocp.args.JsonSave(manifest(host_state))}), force=force)
    except OSError as error:
        intact = (f"the newest intact checkpoint, step {newest}, is untouched and a rerun of the same command resumes "
                  "from it" if newest is not None else "there is no earlier checkpoint, so a rerun starts afresh")
        raise CheckpointWriteError(f"could not write checkpoint {step} into {manager.directory} "
                                   f"({type(error).__name__}: {error.strerror or error}); {intact} once the cause "
                                   "is fixed (permissions, free disk space)") from error
    return True


def close(manager: ocp.CheckpointManager, *, failing: bool) -> None:
    """Closes ``manager``. ``failing``: another error is on its way out (a failed save, a diverged step), and what
    closing raises on top of it, its echo, is dropped so that the first error is the one reported."""
    try:
        manager.close()
    except Exception:
        if not failing:
            raise


def _structure_mismatch(expected: dict, found: dict) -> list[str]:
    """Differences of leaf paths, shapes and dtypes between two manifests, as readable lines."""
    lines = [f"{path}: missing from the checkpoint" for path in expected if path not in found]
    lines += [f"{path}: in the checkpoint but not in this model/optimizer" for path in found if path not in expected]
    for path in expected.keys() & found.keys():
        want, have = expected[path], found[path]
        if (want["shape"], want["dtype"]) != (have["shape"], have["dtype"]):
            lines.append(f"{path}: checkpoint {have['dtype']}{have['shape']}, expected {want['dtype']}{want['shape']}")
    return sorted(lines)


def _summary(error: Exception) -> str:
    """The first line of an orbax/tensorstore error, without the storage spec it appends."""
    text = (str(error).split("See full TensorStore details")[0].strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:200]}"


def _read_manifest(manager: ocp.CheckpointManager, step: int) -> dict:
    try:
        found = manager.restore(step, args=ocp.args.Composite(**{MANIFEST: ocp.args.JsonRestore()}))[MANIFEST]
    except Exception as error:  # orbax raises many types for missing or damaged files
        raise CorruptCheckpointError(f"its manifest cannot be read ({_summary(error)})") from error
    if not isinstance(found, dict) or not all(isinstance(entry, dict) for entry in found.values()):
        raise CorruptCheckpointError("its manifest is missing or not a manifest (written by another program, or by "
                                     "attrjax before checkpoints were verified?)")
    return found


def restore_step(manager: ocp.CheckpointManager, step: int, state):
    """The state of checkpoint ``step`` (with the shardings and dtypes of ``state``), verified against its manifest.

    Raises:
      ValueError: the checkpoint is intact but holds another model or optimizer (no older checkpoint would fit).
      CorruptCheckpointError: files are missing, unreadable, or hold other bytes than were saved.
    """
    expected, found = _layout(state), _read_manifest(manager, step)
    mismatch = _structure_mismatch(expected, found)
    if mismatch:
        raise ValueError(f"checkpoint {manager.directory}/{step} does not fit this model/optimizer:\n  "
                         + "\n  ".join(mismatch[:10]) + (f"\n  ... and {len(mismatch) - 10} more" if len(mismatch) > 10
                                                         else "")
                         + "\nuse a fresh directory, or the model and optimizer that wrote it")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}))[STATE]
    except Exception as error:  # tensorstore/orbax raise bare Exception for truncated or missing data files
        raise CorruptCheckpointError(f"its arrays cannot be read ({_summary(error)})") from error
    changed = [path for path, entry in manifest(jax.tree.map(host_value, restored)).items()
               if entry["crc32"] != found[path].get("crc32")]
    if changed:
        raise CorruptCheckpointError(f"{len(changed)} arrays differ from what was saved (checksum mismatch: "
                                     f"{', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''})")
    return restored


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a damaged step out of the manager's directory (kept for inspection, never resumed from); process 0
    moves it in a multi-process run."""
    directory = os.fspath(manager.directory)
    target = os.path.join(f"{directory}.corrupt", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    with primary_first(f"setting aside checkpoint {step}"):
        if is_primary():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(directory, str(step)), target)
    manager.reload()
    return target


def restore_latest(manager: ocp.CheckpointManager, state, *, log: Callable[[str], None] = print):
    """Returns the newest intact saved state (with the shardings and dtypes of ``state``), or ``state`` if none.

    A checkpoint that fails verification (missing, truncated or altered files) is moved to ``<directory>.corrupt/``
    with a message saying which step was skipped and why, and the next older one is tried.

    Raises:
      ValueError: the newest checkpoint holds another model or optimizer (it lists the differing arrays).
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore_step(manager, step, state)
        except CorruptCheckpointError as error:
            target = _set_aside(manager, step)
            log(f"skipping checkpoint {manager.directory}/{step}: {error}; moved to {target}")
    return state
