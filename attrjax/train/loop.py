"""The training loop: one compiled step, progress lines, periodic checkpoints and exact resume."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import jax
import numpy as np
import optax

from attrjax.models import VGG
from attrjax.train import checkpoint
from attrjax.train.sharding import data_mesh, replicate, shard_batch
from attrjax.train.state import TrainState
from attrjax.train.step import Objective, jit_train_step, make_train_step

# ``batches(start_step)`` yields the batches of steps start_step, start_step + 1, ...: a pure function of the step,
# so that a resumed run sees exactly the batches an uninterrupted one would.
BatchesFrom = Callable[[int], Iterator[dict]]
STEP_INPUTS = ("image", "labels")  # what the step reads; other keys (e.g. masks) stay on the host


def check_batch(batch: dict, step: int):
    """Host-side input validation: float images must be finite (NaN/inf would silently poison the weights)."""
    images = batch["image"]
    if not np.all(np.isfinite(images)):
        raise ValueError(f"batch of step {step} contains non-finite image values (NaN or inf); check the data "
                         "source and the normalisation constants")


def train(student: VGG, variables: dict, tx: optax.GradientTransformation, objective: Objective,
          batches: BatchesFrom, num_steps: int, *, rng: jax.Array, teacher: VGG | None = None,
          teacher_variables: dict | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 500,
          log_every: int = 50, name: str = "train", log: Callable[[str], None] = print,
          mesh: jax.sharding.Mesh | None = None):
    """Trains ``student`` for ``num_steps`` steps, resuming from the newest checkpoint in ``checkpoint_dir``.

    Returns:
      ``(state, history)``: the final ``TrainState`` and a list of logged metric dicts (step, losses, images/s).
    """
    mesh = data_mesh() if mesh is None else mesh
    step_fn = jit_train_step(make_train_step(student, tx, objective, teacher), mesh)
    state = TrainState.create(variables, tx)
    manager = checkpoint.checkpoint_manager(checkpoint_dir, save_every=checkpoint_every) if checkpoint_dir else None
    if manager is not None:
        state = checkpoint.restore_latest(manager, state)
    start = int(state.step)
    if start:
        log(f"[{name}] resuming from the checkpoint of step {start}")
    state = replicate(state, mesh)
    teacher_variables = replicate(teacher_variables or {}, mesh)

    history, tick, images_seen = [], time.perf_counter(), 0
    batch_iter = batches(start)
    for step in range(start + 1, num_steps + 1):
        batch = {key: value for key, value in next(batch_iter).items() if key in STEP_INPUTS}
        check_batch(batch, step)
        state, metrics = step_fn(state, teacher_variables, shard_batch(batch, mesh), rng)
        images_seen += len(batch["image"])
        if manager is not None:
            checkpoint.save(manager, state, step=step, force=step == num_steps)
        if step % log_every == 0 or step == num_steps:
            record = {key: float(value) for key, value in metrics.items()}
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"[{name}] loss became {record['loss']} at step {step}; lower the learning "
                                         "rate or the matching weight")
            elapsed = time.perf_counter() - tick
            record.update(step=step, images_per_s=images_seen / elapsed)
            history.append(record)
            log(f"[{name}] step {step}/{num_steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                                  if k.endswith("loss"))
                + f"  {record['images_per_s']:.0f} img/s")
            tick, images_seen = time.perf_counter(), 0
    if manager is not None:
        manager.wait_until_finished()
    return state, history
