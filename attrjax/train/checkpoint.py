"""Orbax checkpoints of the whole ``TrainState`` (params, BatchNorm statistics, optimizer state, step)."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(directory: str, *, save_every: int, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A manager that saves every ``save_every`` steps (and on ``force=True``) and keeps the newest few."""
    if save_every < 1:
        raise ValueError(f"save_every must be a positive number of steps, got {save_every}")
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=max_to_keep)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(manager: ocp.CheckpointManager, state):
    """Returns the newest saved state (with the shardings and dtypes of ``state``), or ``state`` if none exists."""
    step = manager.latest_step()
    if step is None:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError) as error:
        raise ValueError(f"checkpoint {manager.directory}/{step} does not fit this model/optimizer ({error}); "
                         "use a fresh work directory or the configuration that wrote it") from error


def save(manager: ocp.CheckpointManager, state, *, step: int | None = None, force: bool = False):
    """Saves ``state`` as ``step`` when the manager's interval (or ``force``) says so. Pass the host's step counter
    where you have it: reading ``state.step`` waits for the device to finish the step."""
    step = int(state.step) if step is None else step
    if force or manager.should_save(step):
        manager.save(step, args=ocp.args.StandardSave(state), force=force)
