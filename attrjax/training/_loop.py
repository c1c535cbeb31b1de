"""The training loop: one compiled step, progress lines, periodic checkpoints and exact resume.

A run cannot lie about itself: its checkpoint directory is bound to the settings that wrote it
(``attrjax.training.check_run_config``), and no state holding NaN or inf is ever checkpointed. The loop reads the step's
finiteness flags at every log line and before every save (never every step, which would wait for the device), and
on divergence stops naming the first non-finite step, the term that went non-finite first and the likely cause.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import optax

from attrjax.distributed import check_same_everywhere, is_primary, primary_first
from attrjax.models import ModelLike
from attrjax.models._split import check_images
from attrjax._paths import path_name
from attrjax._progress import Progress
from attrjax.training import _checkpoint as checkpoint
from attrjax.training._metrics import ScalarWriter
from attrjax.training._run_config import bind_run_config, check_on_config_change
from attrjax.training._sharding import data_mesh, host_value, replicate, shard_batch
from attrjax.training._state import TrainState
from attrjax.training._objective import LossTerm, Objective, as_terms, objective_record
from attrjax.training._step import jit_train_step, make_train_step

# ``batches(start_step)`` yields the batches of steps start_step, start_step + 1, ...: a pure function of the step,
# so that a resumed run sees exactly the batches an uninterrupted one would. In a multi-process run each process
# yields only its rows of every global batch (``attrjax.training.process_rows``).
BatchesFrom = Callable[[int], Iterator[dict]]
STEP_INPUTS = ("image", "labels")  # what the step reads; other keys (e.g. masks) stay on the host


def check_batch(batch: dict, step: int):
    """Host-side input validation: images must be floating point (normalised, not raw uint8 pixels), and images and
    labels finite (NaN/inf would silently poison the weights)."""
    check_images(batch["image"], f"batch of step {step}")
    for key in STEP_INPUTS:
        values = np.asarray(batch[key])
        if np.issubdtype(values.dtype, np.inexact) and not np.all(np.isfinite(values)):
            raise ValueError(f"batch of step {step} contains non-finite {key} values (NaN or inf); check the data "
                             "source" + (" and the normalisation constants" if key == "image" else ""))


def divergence_cause(record: dict, *, first_step_of_run: bool, terms: Sequence[LossTerm]) -> str:
    """The likely cause of a non-finite step, from its metrics ``record`` (loss terms as floats, flags as bools)."""
    if not record.get("teacher_finite", True):
        return ("the teacher's logits or maps are NaN/inf: its variables are broken (retrain it, or check the "
                "checkpoint or file it was loaded from)")
    for term in terms:
        if not np.isfinite(record[term.name]):
            return term.divergence_hint(first_step_of_run)
    if not record["gradients_finite"]:
        return "the losses were finite but their gradients overflowed: lower the learning rate or the matching weight"
    return ("the losses and gradients were finite but the update made the weights non-finite: check the learning-rate "
            "schedule, or lower the learning rate")


def _loss_names(terms: Sequence[LossTerm]) -> tuple[str, ...]:
    return ("loss",) + tuple(term.name for term in terms)


def _non_finite_terms(record: dict, terms: Sequence[LossTerm]) -> list[str]:
    names = [key for key in _loss_names(terms) if not np.isfinite(record[key])]
    return names + [key[:-len("_finite")] for key in ("teacher_finite", "gradients_finite", "state_finite")
                    if not record.get(key, True)]


def check_finite(pending: list[tuple[int, dict]], *, name: str, start_step: int, terms: Sequence[LossTerm]) -> None:
    """Raises ``FloatingPointError`` for the first of ``pending`` ``(step, metrics)`` whose losses, gradients or
    updated state are non-finite; one device-to-host transfer for all of them."""
    steps, metrics = zip(*pending)
    for step, record in zip(steps, jax.tree.map(host_value, list(metrics))):
        record = {key: (bool(value) if key.endswith("_finite") else float(value)) for key, value in record.items()}
        non_finite = _non_finite_terms(record, terms)
        if non_finite:
            cause = divergence_cause(record, first_step_of_run=step == start_step + 1, terms=terms)
            raise FloatingPointError(
                f"[{name}] step {step} went non-finite ({', '.join(non_finite)}: "
                + ", ".join(f"{key} {record[key]:.4g}" for key in _loss_names(terms))
                + f"). Likely cause: {cause}. Nothing from step {step} on was checkpointed; the newest checkpoint "
                "is the last finite state, so a rerun with a fixed setting resumes from it")


def run_record(num_steps: int, objective: Objective | Sequence[LossTerm], params,
               run_config: Mapping[str, Any] | None) -> dict:
    """What a checkpoint directory of ``train`` is bound to: the step count, the objective, the parameter shapes
    and the caller's ``run_config``."""
    return {"num_steps": num_steps, "objective": objective_record(objective), "param_shapes": param_shapes(params),
            "config": dict(run_config or {})}


def param_shapes(params) -> dict[str, list[int]]:
    """``{"conv1/kernel": [3, 3, 3, 16], ...}`` for any parameter pytree (linen dicts, NNX states, lists), named by
    ``attrjax._paths.path_name``."""
    return {path_name(path): list(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where and how a training run keeps its records: checkpoints, the settings they are bound to, progress lines
    and metric files. None of it changes what is learned.

    Attributes:
      checkpoint_dir: where checkpoints go and a rerun resumes from (the newest intact one); None: no checkpoints.
      checkpoint_every: steps between checkpoints (and the last step).
      run_config: JSON-compatible settings of this run (data, seed, model, optimizer, ...) that ``checkpoint_dir`` is
        bound to, together with ``num_steps``, the objective and the parameter shapes, which are always recorded.
        A rerun whose record differs is refused (``attrjax.training.check_run_config``).
      on_config_change: ``"refuse"`` (default) or ``"restart"`` (set the old directory aside and train afresh).
      log_every: steps between progress lines, finiteness checks and metric rows.
      name: the run's name in progress lines (``[name] step ...``).
      log: where progress lines go.
      metric_writer: anything with ``write(step, {name: value})`` (``attrjax.training.MetricWriter``: TensorBoard event
        files and a CSV) receives every logged line as ``train/<loss term>``, ``train/images_per_s`` and, with
        ``learning_rate`` (the optimizer's schedule, step -> rate), ``train/learning_rate``.
      learning_rate: the optimizer's schedule, to log the rate.
    """

    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    run_config: Mapping[str, Any] | None = None
    on_config_change: str = "refuse"
    log_every: int = 50
    name: str = "train"
    log: Callable[[str], None] = print
    metric_writer: ScalarWriter | None = None
    learning_rate: Callable[[int], Any] | None = None

    def __post_init__(self):
        """Bad values are refused here, before a run binds or writes anything."""
        checkpoint.check_step_count("checkpoint_every", self.checkpoint_every)
        checkpoint.check_step_count("log_every", self.log_every)
        check_on_config_change(self.on_config_change)


def _run_options(run: RunOptions | None, legacy: dict[str, Any]) -> RunOptions:
    """``run``, or the 0.1 keyword arguments of ``train`` gathered into one (with a warning naming the new way)."""
    unknown = sorted(set(legacy) - {field.name for field in dataclasses.fields(RunOptions)})
    if unknown:
        raise TypeError(f"train() got unexpected keyword arguments {unknown}")
    if run is not None and not isinstance(run, RunOptions):
        raise TypeError(f"run must be an attrjax.training.RunOptions, got {type(run).__name__}: e.g. "
                        "run=RunOptions(checkpoint_dir=..., log_every=...)")
    if not legacy:
        return RunOptions() if run is None else run
    if run is not None:
        raise TypeError(f"pass {sorted(legacy)} inside run=RunOptions(...), not beside it")
    keywords = ", ".join(f"{key}=..." for key in legacy)
    warnings.warn(f"train(..., {keywords}) is deprecated and will be removed in attrjax 0.3.0: pass "
                  f"run=attrjax.training.RunOptions({keywords})", DeprecationWarning, stacklevel=3)
    return RunOptions(**legacy)


def train(student: ModelLike, variables: dict, tx: optax.GradientTransformation,
          objective: Objective | Sequence[LossTerm], batches: BatchesFrom, num_steps: int, *, rng: jax.Array,
          teacher: ModelLike | None = None, teacher_variables: dict | None = None,
          mesh: jax.sharding.Mesh | None = None, run: RunOptions | None = None,
          **deprecated_run_options) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains ``student`` for ``num_steps`` steps, resuming from the newest intact checkpoint in
    ``run.checkpoint_dir``.

    The learning problem is the arguments; the run's bookkeeping (checkpoints, the settings they are bound to,
    progress lines, metric files) is ``run``.

    Args:
      student: anything ``attrjax.models.as_split_model`` takes (a split model, attrjax's VGG or ResNet, a Flax
        linen or NNX classifier).
      variables: the student's initial ``{"params", "batch_stats"?}``.
      tx: the optimizer.
      objective: an ``Objective`` or a list of loss terms.
      batches: ``batches(start_step)`` yields the batches of steps ``start_step``, ``start_step + 1``, ... (a pure
        function of the step, so a resumed run sees the batches an uninterrupted one would).
      num_steps: the run's total number of steps, counted from step 0 whatever it resumes from.
      rng: the run's key; each step folds in its step number.
      teacher: the same kinds of model, or None when the objective needs no teacher.
      teacher_variables: the teacher's variables (constants).
      mesh: the devices to train on (default ``data_mesh()``: every device of every process).
      run: ``RunOptions``; default: no checkpoints, a line every 50 steps to ``print``.

    In a multi-process run (``attrjax.distributed.initialize``) every process calls ``train`` with the same
    arguments except ``batches``, which yields that process's rows; the processes' run records must agree, process 0
    writes the run record, the log and the metrics, and all of them write the checkpoints (as orbax requires; the
    directory must be on a file system they share).

    Returns:
      ``(state, history)``: the final ``TrainState`` and a list of logged metric dicts (step, losses, images/s).

    Raises:
      FloatingPointError: a step went non-finite (names the step, the term and the likely cause); nothing
        non-finite was checkpointed.
      attrjax.training.RunConfigMismatchError: ``run.checkpoint_dir`` was written with other settings.
      attrjax.training.CheckpointWriteError: a checkpoint could not be written (permissions, a full disk); the run
        stops at once, naming the newest intact checkpoint, which a rerun resumes from.
    """
    run = _run_options(run, deprecated_run_options)
    checkpoint_dir, log_every, name = run.checkpoint_dir, run.log_every, run.name
    log, metric_writer = run.log, run.metric_writer
    checkpoint.check_step_count("num_steps", num_steps)
    mesh = data_mesh() if mesh is None else mesh
    step_fn = jit_train_step(make_train_step(student, tx, objective, teacher), mesh)
    # Replicated before a restore, so orbax reads the checkpoint straight into the mesh's layout; a copy, since the
    # step donates it.
    state = replicate(TrainState.create(variables, tx), mesh)
    if not is_primary():
        log, metric_writer = (lambda line: None), None
    manager = None
    if checkpoint_dir:
        record = run_record(num_steps, objective, state.params, run.run_config)
        check_same_everywhere("run record", record)
        with primary_first(f"binding {checkpoint_dir} to its run record"):
            bind_run_config(checkpoint_dir, record, on_config_change=run.on_config_change, log=log)
        manager = checkpoint.checkpoint_manager(checkpoint_dir, save_every=run.checkpoint_every)
    try:
        if manager is not None:
            state = checkpoint.restore_latest(manager, state, log=lambda line: log(f"[{name}] {line}"))
        return _run_steps(step_fn, state, teacher_variables, batches, num_steps, rng=rng, manager=manager, mesh=mesh,
                          terms=as_terms(objective), log_every=log_every, name=name, log=log,
                          metric_writer=metric_writer, learning_rate=run.learning_rate)
    finally:
        if manager is not None:  # an unclosed manager floods stderr at exit
            checkpoint.close(manager, failing=sys.exc_info()[0] is not None)


def _run_steps(step_fn, state, teacher_variables, batches, num_steps, *, rng, manager, mesh, terms, log_every,
               name, log, metric_writer, learning_rate):
    start = int(host_value(state.step))
    if start:
        log(f"[{name}] resuming from the checkpoint of step {start}")
        if hasattr(metric_writer, "resume_from"):  # it logged the steps a killed run made after that checkpoint
            metric_writer.resume_from(start)
    teacher_variables = replicate(teacher_variables or {}, mesh)
    rng = replicate(rng, mesh)

    history, tick, images_seen, pending = [], time.perf_counter(), 0, []
    batch_iter = batches(start)
    with Progress(num_steps, description=f"[{name}] step", unit="step", initial=start,
                  bar=None if is_primary() else False) as progress:
        for step in range(start + 1, num_steps + 1):
            batch = {key: value for key, value in next(batch_iter).items() if key in STEP_INPUTS}
            check_batch(batch, step)
            global_batch = shard_batch(batch, mesh)
            state, metrics = step_fn(state, teacher_variables, global_batch, rng)
            images_seen += global_batch["image"].shape[0]
            pending.append((step, metrics))
            last = step == num_steps
            logging = last or step % log_every == 0
            saving = manager is not None and (last or manager.should_save(step))
            if saving or logging:
                check_finite(pending, name=name, start_step=start, terms=terms)  # waits for the step
                pending = []
            progress.step()  # after the wait at a log line, so the pace there is the devices', not the dispatch's
            if saving:
                checkpoint.save(manager, state, step=step, force=last)
            if logging:
                record = {key: float(host_value(metrics[key])) for key in _loss_names(terms)}
                now = time.perf_counter()
                record.update(step=step, images_per_s=images_seen / (now - tick))
                if learning_rate is not None:
                    record["learning_rate"] = float(learning_rate(step - 1))  # the rate the step applied
                history.append(record)
                if metric_writer is not None:
                    metric_writer.write(step, {f"train/{key}": value for key, value in record.items()
                                               if key != "step"})
                log(f"[{name}] step {progress.status()}  "
                    + "  ".join(f"{k} {record[k]:.4f}" for k in _loss_names(terms))
                    + f"  {record['images_per_s']:.0f} img/s")
                tick, images_seen = time.perf_counter(), 0
    return state, history
