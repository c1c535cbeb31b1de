"""The experiments' runs: each run's keys, directories, record and metrics, training (or resuming) a run and loading
a finished one, and the command line every experiment module's ``main`` runs (``main_for``)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback
import zlib
from typing import Callable

import jax
import optax

from attrjax import distributed
from attrjax._locking import DirectoryInUseError, exclusive_directory
from attrjax.pruning import keep_pruned_at_zero
from attrjax.training import (MetricWriter, Objective, RunConfigMismatchError, RunOptions, TrainState,
                              check_run_config, checkpoint_manager, data_mesh, make_optimizer, optimizer_schedule,
                              read_run_config, replicate, restore_latest, run_record, train)
from attrjax.training._sharding import host_value
from experiments import configuration, datasets, models


TEACHER = "teacher"
# Where the data lives and how its batches are built are not what it is: moving a dataset or loading it with more
# workers does not make its runs stale.
NOT_PART_OF_A_RUN = ("data_dir", "manual_dir", "workers", "threads")


def run_keys(name: str, config) -> tuple[jax.Array, jax.Array]:
    """The (init, step) keys of the run called ``name``: a pure function of the seed and the name."""
    init_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode())))
    return init_key, step_key


def checkpoint_dir(name: str, workdir: str) -> str:
    return os.path.join(workdir, name, "checkpoints")


def run_config(name: str, settings: dict, config, workdir: str, *, with_teacher: bool) -> dict:
    """The settings that decide run ``name``'s result besides its steps, objective and parameter shapes (which
    ``attrjax.training.train`` records itself): seed, data, the run's own ``settings`` (model or pruning config) and,
    for runs trained against the teacher, the digest of the teacher run they learnt from."""
    data = {key: value for key, value in config.data.to_dict().items() if key not in NOT_PART_OF_A_RUN}
    record = {"run": name, "seed": config.seed, "data": data, "settings": settings}
    if models.compute_dtype_name(config) != "float32":  # recorded only when not float32: earlier runs stay valid
        record["compute_dtype"] = models.compute_dtype_name(config)
    if with_teacher:
        teacher_record = read_run_config(checkpoint_dir(TEACHER, workdir))
        if teacher_record is None:
            raise FileNotFoundError(f"{checkpoint_dir(TEACHER, workdir)} has no trained teacher; run "
                                    "experiments.train_teacher first")
        record["teacher_digest"] = teacher_record["digest"]
    return record


def metrics_dir(name: str, workdir: str) -> str:
    """Where run ``name``'s curves go (``attrjax.training.MetricWriter``); the rounds of a run
    (``unstructured/round02``) share their run's."""
    return os.path.join(workdir, name.split("/")[0], "metrics")


def metric_writer(directory: str, step_offset: int = 0):
    """A ``MetricWriter`` on process 0; nothing (None) on the others."""
    if distributed.is_primary():
        return MetricWriter(directory, step_offset=step_offset)
    return contextlib.nullcontext()


def fit(name: str, model, variables: dict, optimizer, objective: Objective, num_steps: int, config, workdir: str,
        train_split, *, settings: dict, teacher=None, teacher_variables: dict | None = None, masks=None,
        step_offset: int = 0) -> dict:
    """Trains (or resumes) ``model`` from ``variables`` into ``workdir/name`` with the ``optimizer`` config (and, with
    ``masks``, pruned weights kept at zero); returns the final variables.

    The run's directory is bound to its settings (``run_config``): a rerun with other settings is refused unless
    ``config.on_config_change`` is ``"restart"``. Every logged line also goes to ``metrics_dir(name)`` (TensorBoard
    events and a CSV), with the optimizer's learning rate and steps shifted by ``step_offset``.
    """
    tx = make_optimizer(optimizer, num_steps)
    if masks is not None:
        tx = keep_pruned_at_zero(tx, masks)
    _, step_key = run_keys(name, config)
    batches = functools.partial(datasets.train_batches, train_split, config)
    with metric_writer(metrics_dir(name, workdir), step_offset=step_offset) as writer:
        record = run_config(name, settings, config, workdir, with_teacher=teacher is not None)
        run = RunOptions(checkpoint_dir=checkpoint_dir(name, workdir), checkpoint_every=config.checkpoint_every,
                         run_config=record, on_config_change=config.on_config_change, log_every=config.log_every,
                         name=name, metric_writer=writer, learning_rate=optimizer_schedule(optimizer, num_steps))
        state, _ = train(model, variables, tx, objective, batches, num_steps, rng=step_key, teacher=teacher,
                         teacher_variables=teacher_variables, run=run)
    return jax.tree.map(host_value, state.variables)


def restore_finished(name: str, template: dict, tx: optax.GradientTransformation, objective: Objective,
                     num_steps: int, config, workdir: str, *, settings: dict, with_teacher: bool) -> dict:
    """The final variables of a run that ``fit`` finished in ``workdir/name`` with the same settings (``template``:
    variables of the same shapes, ``tx``: its optimizer)."""
    directory = checkpoint_dir(name, workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} holds no run of {name!r}; train it first")
    check_run_config(directory, run_record(num_steps, objective, template["params"],
                                           run_config(name, settings, config, workdir, with_teacher=with_teacher)))
    manager = checkpoint_manager(directory, save_every=config.checkpoint_every)
    try:
        state = restore_latest(manager, replicate(TrainState.create(template, tx), data_mesh()),
                               log=lambda line: print(f"[{name}] {line}"))
    finally:
        manager.close()
    state = jax.tree.map(host_value, state)
    if int(state.step) != num_steps:
        raise FileNotFoundError(f"{directory} holds no finished run of {name!r} (newest intact step "
                                f"{int(state.step)}, expected {num_steps}); rerun its training command to finish it")
    return state.variables


def train_model(name: str, model_config, objective: Objective, config, workdir: str, train_split, *,
                teacher=None, teacher_variables: dict | None = None) -> tuple:
    """Trains (or resumes) a freshly initialised model of ``model_config`` into ``workdir/name``."""
    model = models.build_model(model_config, config)
    init_key, _ = run_keys(name, config)
    variables = models.init_model(model, init_key, config)
    if model_config.get("pretrained"):
        variables = models.pretrained_variables(name, model_config.pretrained, model, variables)
    return model, fit(name, model, variables, model_config.optimizer, objective, model_config.num_steps, config,
                      workdir, train_split, settings=model_config.to_dict(), teacher=teacher,
                      teacher_variables=teacher_variables)


def load_trained(name: str, model_config, objective: Objective, config, workdir: str, *, dtype=None) -> tuple:
    """The final variables of a model that ``train_model`` trained into ``workdir/name`` with ``objective``, and
    the model computing in ``dtype`` (default: the one it trained in; evaluation passes float32)."""
    model = models.build_model(model_config, config, dtype=dtype)
    tx = make_optimizer(model_config.optimizer, model_config.num_steps)
    template = models.variables_template(model, config)
    return model, restore_finished(name, template, tx, objective, model_config.num_steps, config, workdir,
                                   settings=model_config.to_dict(), with_teacher=name != TEACHER)


def load_teacher(config, workdir: str, *, dtype=None) -> tuple:
    """The trained teacher of ``workdir`` (computing in ``dtype``, as ``load_trained``)."""
    return load_trained(TEACHER, config.teacher, models.make_objective(config), config, workdir, dtype=dtype)


def join_processes(args) -> None:
    """Joins a multi-process run when the command line or environment describes one; the processes other than 0
    write their output to ``<workdir>/logs/process_<i>.log`` (errors still reach stderr)."""
    if not distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                  mode=args.distributed):
        return
    if not distributed.is_primary():
        path = os.path.join(args.workdir, "logs", f"process_{jax.process_index()}.log")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sys.stdout = open(path, "a", buffering=1)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
          f"{jax.device_count()} devices")


def main_for(run: Callable, doc: str, validate: Callable | None = None):
    """The command line of an experiment module: ``validate(config)`` (when given: a module's ``run`` expects a
    validated config), then ``run(config, workdir)``, with --config (and its --config.KEY=VALUE overrides),
    --workdir and the multi-process flags. Every process of a multi-process run must get the same config (checked)."""
    args, overrides = configuration.parse_with_overrides(configuration.arg_parser(doc.splitlines()[0]))
    try:
        join_processes(args)
    except (ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    # Identical programs (each round of iterative pruning, the evaluation of models of one shape, re-runs) compile
    # once, however fast: the demo compiles a few hundred small programs, half of them twice (naive and matched twins).
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        config = configuration.load_config(args.config, overrides)
        distributed.check_same_everywhere("config", config.to_dict())
        if validate is not None:
            validate(config)
        # One writer per work directory (process 0 holds it for all the processes of a multi-process run).
        with exclusive_directory(args.workdir) if distributed.is_primary() else contextlib.nullcontext():
            run(config, args.workdir)
    except RunConfigMismatchError as error:
        sys.exit(f"error: {error}\n(on the command line: --config.on_config_change=restart)")
    except (ValueError, FileNotFoundError, FloatingPointError, DirectoryInUseError) as error:
        sys.exit(f"error: {error}")  # bad settings, missing runs, divergence, another writer
    except OSError as error:  # a checkpoint, curve or result that could not be written: one line, the rest logged
        sys.exit(f"error: {error}{traceback_saved(args.workdir)}")


def traceback_saved(workdir: str) -> str:
    """Writes the exception being handled's traceback to ``<workdir>/logs/error-<time>.txt``; returns
    ``" (traceback in PATH)"``, or ``""`` where it cannot be written (the disk that is full)."""
    path = os.path.join(workdir, "logs", f"error-{time.strftime('%Y%m%d-%H%M%S')}.txt")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(traceback.format_exc())
    except OSError:
        return ""
    return f" (traceback in {path})"
