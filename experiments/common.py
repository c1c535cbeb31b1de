"""Glue shared by the experiment modules: configs, data, model construction, training one model end to end."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import os
import sys
import time
import traceback
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import flags as absl_flags
from absl import logging as absl_logging
from ml_collections import config_flags

from attrjax import data as attr_data
from attrjax import distributed
from attrjax.data import _tfds_datasets as tfds_datasets, voc
from attrjax._locking import DirectoryInUseError, exclusive_directory
from attrjax.models import (VGG, as_split_model, import_resnet, import_vgg, load_state_dict, resnet18, resnet34,
                            resnet50, resnet_small, vgg)
from attrjax.pruning import keep_pruned_at_zero
from attrjax.training import (MetricWriter, Objective, RunConfigMismatchError, TrainState, check_run_config,
                           checkpoint_manager, data_mesh, make_optimizer, optimizer_schedule, process_rows,
                           read_run_config, replicate, restore_latest, run_record, train)
from attrjax.training._sharding import host_value
from attrjax.training._run_config import ON_CONFIG_CHANGE
from attrjax.training import RunOptions


def quiet_tfds():
    """Experiments print their own progress: silence TFDS's progress bars and its per-load config warning."""
    tfds.disable_progress_bar()
    absl_logging.set_verbosity(absl_logging.ERROR)


CONFIGS_DIR = os.path.join(os.path.dirname(__file__), "configs")


class _ListParser(absl_flags.ArgumentParser):
    """``[0.7, 0.5]`` (a Python list literal) for list-valued config fields, such as per-conv pruning rates, which
    ``config_flags`` has no parser for."""

    def parse(self, argument):
        if isinstance(argument, list):
            return argument
        try:
            value = ast.literal_eval(argument)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{argument!r} is not a list literal such as [0.5, 0.7]")
        return list(value)

    def flag_type(self):
        return "list"


config_flags.register_flag_parser_for_type(list, _ListParser())


def config_file(name: str) -> str:
    """``path/to/config.py[:argument]`` for a preset name (``quick``, ``paper:argument``) or a path as given."""
    path, colon, argument = name.partition(":")
    if not path.endswith(".py"):
        preset = os.path.join(CONFIGS_DIR, f"{path}.py")
        if not os.path.isfile(preset):
            available = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_"))
            raise ValueError(f"unknown config {path!r}; available: {available} (or a path to a .py file)")
        path = preset
    elif not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    return path + colon + argument


def load_config(name: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """A config file's ``get_config()`` (``name``: see ``config_file``) with ``key.sub=value`` overrides, parsed by
    ``ml_collections.config_flags`` as ``--config.key.sub=value`` is: typed by the field each one replaces."""
    path = config_file(name)
    config = _parse_config(path, [])
    flags = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals:
            raise ValueError(f"config override {override!r} is not KEY=VALUE (e.g. teacher.num_steps=100)")
        expected = _check_key(config, key)
        flags.append((f"--config.{key}={value}", f"config key {key!r} is of type {type(expected).__name__}"))
    return _parse_config(path, flags) if flags else config


def _parse_config(path: str, flags: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """``config_flags`` on a command line of ``--config=path`` and ``flags`` ((flag, what it overrides) pairs)."""
    argv = ["attrjax", f"--config={path}", *(flag for flag, _ in flags)]
    flag_values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    try:
        flag_values(argv)
    except absl_flags.IllegalFlagValueError as error:
        culprit = next((what for flag, what in flags if str(error).startswith(f"flag {flag.partition('=')[0]}=")),
                       None)
        if culprit is None:  # the file itself: a syntax error, no get_config, an argument it does not take
            raise ValueError(f"cannot load config {path}: {str(error).strip().splitlines()[-1]}") from None
        raise ValueError(f"{culprit}: {error}") from None
    return holder.value


def _check_key(config: ml_collections.ConfigDict, key: str):
    """The value at dotted ``key``; raises naming the first part that does not exist and what exists there."""
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "the config"
            known = f"; it has: {', '.join(sorted(node.keys()))}" if isinstance(node, ml_collections.ConfigDict) else ""
            raise ValueError(f"unknown config key {key!r}: {where} has no {part!r}{known}")
        node = node[part]
    return node


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` (a preset or a config file) and the deprecated ``--set``, which ``parse_with_overrides``
    reads together with every ``--config.KEY=VALUE``."""
    parser.add_argument("--config", default="quick", help="a preset of experiments/configs (quick, paper, ...) or a "
                        "config file, each optionally with :ARGUMENT for its get_config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="deprecated: use --config.KEY=VALUE")


def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog="Override any config value with --config.KEY=VALUE, e.g. "
        "--config.teacher.num_steps=100 (typed by the config's own field).")
    add_config_arguments(parser)
    parser.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and results go")
    group = parser.add_argument_group("multi-process runs (one process per host; see docs/multihost.md)")
    group.add_argument("--distributed", choices=distributed.MODES, default="auto",
                       help="auto: join a multi-process run when a coordinator is given or a cluster manager (SLURM, "
                       "Open MPI, Cloud TPU) started several processes; on: always (JAX detects the rest); off")
    group.add_argument("--coordinator_address", default=None,
                       help=f"host:port of process 0 (or {distributed.COORDINATOR_ENV})")
    group.add_argument("--num_processes", type=int, default=None, help=f"(or {distributed.NUM_PROCESSES_ENV})")
    group.add_argument("--process_id", type=int, default=None, help=f"(or {distributed.PROCESS_ID_ENV})")
    return parser


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed flags, and the config overrides (``KEY=VALUE``) of every ``--config.KEY=VALUE`` or
    ``--config.KEY VALUE`` on the command line, then of the deprecated ``--set`` (which warns)."""
    args, rest = parser.parse_known_args(argv)
    overrides = []
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--config."):
            parser.error(f"unrecognized argument {flag!r} (config values are set with --config.KEY=VALUE)")
        key, equals, value = flag[len("--config."):].partition("=")
        if not equals:
            if not rest:
                parser.error(f"{flag} needs a value: {flag}=VALUE")
            value = rest.pop(0)
        overrides.append(f"{key}={value}")
    if args.set:
        print("warning: --set is deprecated and will be removed; write each KEY=VALUE as --config.KEY=VALUE, e.g. "
              f"--config.{args.set[0]}", file=sys.stderr)
    return args, overrides + args.set


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
    args, overrides = parse_with_overrides(arg_parser(doc.splitlines()[0]))
    try:
        join_processes(args)
    except (ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    # Identical programs (each round of iterative pruning, the evaluation of models of one shape, re-runs) compile
    # once, however fast: the demo compiles a few hundred small programs, half of them twice (naive and matched twins).
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        config = load_config(args.config, overrides)
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


def check_count(name: str, value, *, minimum: int = 1) -> None:
    """Raises unless ``value`` is an int >= ``minimum`` (config values such as step counts and sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value) -> None:
    """Raises unless ``value`` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def check_config(config) -> None:
    """The settings every experiment module shares: seed, data, checkpoint/log intervals, the rerun policy."""
    check_count("seed", config.seed, minimum=0)
    check_count("checkpoint_every", config.checkpoint_every)
    check_count("log_every", config.log_every)
    check_count("data.batch_size", config.data.batch_size)
    check_count("data.image_size", config.data.image_size)
    check_count("data.num_classes", config.data.num_classes, minimum=2)
    check_count("data.workers", config.data.workers, minimum=0)
    check_count("data.threads", config.data.threads, minimum=0)
    check_fraction("stochastic_drop_rate", config.stochastic_drop_rate)
    compute_dtype(config)
    if config.data.name == "shapes":
        check_count("data.seed", config.data.seed, minimum=0)
    if not isinstance(config.runs, str):
        raise ValueError(f"runs must be a string of comma-separated run names ('' for all), got {config.runs!r}")
    normalization(config)  # an unknown dataset name fails here
    if config.data.labels not in ("multilabel", "single"):
        raise ValueError(f"data.labels must be 'multilabel' or 'single', got {config.data.labels!r}")
    if config.on_config_change not in ON_CONFIG_CHANGE:
        raise ValueError(f"on_config_change must be one of {ON_CONFIG_CHANGE}, got {config.on_config_change!r}")


def check_model_run(name: str, model_config, objective_fn: Callable[[], Objective], config):
    """Validates one model's training settings without training it (model, steps, optimizer, objective); returns
    the model. ``objective_fn`` builds the objective, whose constructor checks it."""
    try:
        check_count("num_steps", model_config.num_steps)
        make_optimizer(model_config.optimizer, model_config.num_steps)
        objective_fn()
        return build_model(model_config, config)
    except (ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"settings of the {name!r} run: {error}") from error


def _run_names(config) -> list[str]:
    return [name.strip() for name in config.runs.split(",") if name.strip()]


def chosen_runs(config, runs: dict) -> dict:
    """The entries of ``runs`` (name -> run config) that ``config.runs`` names; all of them when it is empty."""
    names = _run_names(config)
    return {name: run for name, run in runs.items() if not names or name in names}


def check_chosen_runs(config, available) -> None:
    """Raises if ``config.runs`` names a run that is not among ``available``."""
    unknown = [name for name in _run_names(config) if name not in available]
    if unknown:
        raise ValueError(f"runs names unknown runs {unknown}; this config has: {', '.join(available)}")


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


# The real datasets: their normalisation, and the split that plays "val" (classification) and "localization".
NORMALIZATIONS = {"shapes": attr_data.SHAPES_NORMALIZATION, "voc2012": attr_data.VOC_NORMALIZATION,
                  "oxford_iiit_pet": attr_data.IMAGENET_NORMALIZATION,
                  "caltech_birds2011": attr_data.IMAGENET_NORMALIZATION}


def normalization(config) -> attr_data.Normalization:
    if config.data.name not in NORMALIZATIONS:
        raise ValueError(f"unknown dataset {config.data.name!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[config.data.name]


def class_names(config, workdir: str) -> tuple[str, ...]:
    if config.data.name == "shapes":
        return attr_data.CLASS_NAMES
    if config.data.name == "voc2012":
        return voc.CLASS_NAMES
    return tfds_datasets.class_names(config.data.name, data_dir(config, workdir))


def _shapes_splits(config, directory: str) -> dict:
    shapes = attr_data.ShapesConfig(**{field.name: config.data[field.name]
                                       for field in dataclasses.fields(attr_data.ShapesConfig)})
    sizes = dict(num_train=config.data.num_train, num_val=config.data.num_val,
                 num_localization=config.data.num_localization, seed=config.data.seed)
    attr_data.build_shapes(directory, shapes=shapes, **sizes)
    return {split: attr_data.load_split(directory, split, shapes=shapes, **sizes)
            for split in ("train", "val", "localization")}


def _voc_splits(config, directory: str) -> dict:
    """Main/train (encoded, cropped on the fly), Main/val and Segmentation/val resized
    (docs/method.md#data-and-preprocessing)."""
    voc.build_voc(directory, manual_dir=config.data.manual_dir or None)
    size, difficult = config.data.image_size, config.data.include_difficult
    print("voc2012: decoding and resizing the evaluation images")
    return {"train": voc.load_voc(directory, "train", include_difficult=difficult),
            "val": attr_data.resize_split(voc.load_voc(directory, "val", include_difficult=difficult), size),
            "localization": attr_data.resize_split(voc.load_voc(directory, "val", config="segmentation"), size,
                                                   labels_from_masks=True)}


def _tfds_splits(config, directory: str) -> dict:
    """A prepared TFDS dataset with masks: train (encoded), test resized for both classification and localisation."""
    test = attr_data.resize_split(tfds_datasets.load_tfds_split(config.data.name, "test", directory),
                                  config.data.image_size)
    return {"train": tfds_datasets.load_tfds_split(config.data.name, "train", directory),
            "val": {"image": test["image"], "labels": test["labels"]}, "localization": test}


def load_splits(config, workdir: str) -> dict[str, dict[str, np.ndarray] | attr_data.LabeledImages]:
    """Builds the dataset if needed; ``train`` as arrays (shapes) or encoded images, ``val`` and ``localization``
    as in-memory arrays (``localization`` with masks)."""
    quiet_tfds()
    normalization(config)  # an unknown dataset name fails here
    loaders = {"shapes": _shapes_splits, "voc2012": _voc_splits}
    with distributed.primary_first("building the dataset"):  # the others find it built
        splits = loaders.get(config.data.name, _tfds_splits)(config, data_dir(config, workdir))
    num_classes = splits["localization"]["labels"].shape[1]
    if num_classes != config.data.num_classes:
        raise ValueError(f"{config.data.name} has {num_classes} classes but config.data.num_classes is "
                         f"{config.data.num_classes}; set data.num_classes={num_classes}")
    if config.data.labels == "single":
        for name, split in splits.items():
            labels = split.labels if isinstance(split, attr_data.LabeledImages) else split["labels"]
            per_image = np.sum(np.asarray(labels) > 0, axis=-1)
            wrong = np.flatnonzero(per_image != 1)
            if wrong.size:
                raise ValueError(f"data.labels='single' needs exactly one class per image, but {wrong.size} images of "
                                 f"{config.data.name}'s {name} split have another count (image {wrong[0]} has "
                                 f"{per_image[wrong[0]]}); --config.data.labels=multilabel")
    return splits


def num_images(split: dict[str, np.ndarray] | attr_data.LabeledImages) -> int:
    return len(split) if isinstance(split, attr_data.LabeledImages) else len(split["image"])


RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet_small": resnet_small}
ARCHITECTURES = ("vgg",) + tuple(RESNETS)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACCELERATORS = ("gpu", "tpu")


def compute_dtype_name(config) -> str:
    """What teachers and students train in: ``config.compute_dtype``, with ``"auto"`` resolved to bfloat16 on a
    GPU or TPU and float32 elsewhere. Parameters, optimizer state, losses and maps stay float32, and evaluation
    runs in float32."""
    if config.compute_dtype == "auto":
        return "bfloat16" if jax.default_backend() in ACCELERATORS else "float32"
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be 'auto' or one of {', '.join(COMPUTE_DTYPES)}, got "
                         f"{config.compute_dtype!r}")
    return config.compute_dtype


def compute_dtype(config):
    """``compute_dtype_name(config)`` as a dtype."""
    return COMPUTE_DTYPES[compute_dtype_name(config)]


def build_model(model_config, config, *, dtype=None):
    """The model of a teacher/student config by ``arch``: ``vgg`` (``layout``, ``width_divisor``, ``dropout_rate``,
    ``head_pooling``) or a ResNet (``resnet18/34/50`` with ``width_divisor`` and ``stem``; ``resnet_small`` with
    ``width_divisor`` and ``stage_sizes``), computing in ``dtype`` (default: ``compute_dtype(config)``)."""
    arch = model_config.arch
    dtype = compute_dtype(config) if dtype is None else dtype
    if arch == "vgg":
        return vgg(model_config.layout, num_classes=config.data.num_classes, image_size=config.data.image_size,
                   width_divisor=model_config.width_divisor, attribution_layer=config.matching_layer,
                   dropout_rate=model_config.dropout_rate, head_pooling=model_config.head_pooling, dtype=dtype)
    if arch not in RESNETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    options = ({"stage_sizes": tuple(model_config.stage_sizes)} if arch == "resnet_small"
               else {"stem": model_config.stem})
    return RESNETS[arch](config.data.num_classes, width_divisor=model_config.width_divisor, dtype=dtype, **options)


def example_images(config) -> jax.Array:
    return jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)


def check_layer(role: str, model, layer: str, config) -> None:
    """Raises, listing the model's layers, unless ``layer`` is one of them (traced shapes only, nothing runs)."""
    split = as_split_model(model, example_images(config))
    if layer not in split.layers:
        raise ValueError(f"the {role} has no layer {layer!r}; it has: {', '.join(split.layers)}")


@functools.partial(jax.jit, static_argnums=(0, 2))
def _fresh_variables(model, rng: jax.Array, image_size: int) -> dict:
    """One compiled initialisation per architecture and image size (``model`` is a hashable linen module): run
    eagerly, every layer's initialiser dispatches and compiles on its own, several times slower."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return as_split_model(model, images).init(rng, images)


def init_model(model, rng: jax.Array, config) -> dict:
    """Fresh variables of a model from ``build_model``."""
    return _fresh_variables(model, rng, config.data.image_size)


def variables_template(model, config) -> dict:
    """Zeros shaped as ``init_model``'s variables, without running the model: a template to restore into, or to
    check settings against the architecture."""
    shapes = _fresh_variables.eval_shape(model, jax.random.key(0), config.data.image_size)
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def eval_batches(arrays: dict, config):
    """This process's share of an evaluation split (all of it in a single-process run)."""
    return attr_data.eval_batches(arrays, config.eval.batch_size, normalization=normalization(config),
                                  shard=distributed.process_shard())


def train_batches(train_split, config, start_step: int):
    """The training stream from ``start_step``, this process's rows of every global batch: random crops of
    in-memory arrays (shapes) or RandomResizedCrop of encoded images (the real datasets)."""
    loading = dict(rows=process_rows(config.data.batch_size, data_mesh()), workers=config.data.workers,
                   threads=config.data.threads or None)
    if isinstance(train_split, attr_data.LabeledImages):
        return attr_data.random_resized_crop_batches(
            train_split, config.data.batch_size, image_size=config.data.image_size, seed=config.seed,
            start_step=start_step, normalization=normalization(config), **loading)
    return attr_data.train_batches(train_split, config.data.batch_size, seed=config.seed, start_step=start_step,
                                   crop_padding=config.data.crop_padding, normalization=normalization(config),
                                   **loading)


def make_objective(config, **options) -> Objective:
    """The training objective with the dataset's label kind (``config.data.labels``: multilabel or single)."""
    return Objective(labels=config.data.labels, **options)


def compression_objective(config, run) -> Objective:
    """The objective of a student or pruning run: its ``run.objective`` options, matched at
    ``config.matching_layer``."""
    return make_objective(config, matching_layer=config.matching_layer, **run.objective)


def run_keys(name: str, config) -> tuple[jax.Array, jax.Array]:
    """The (init, step) keys of the run called ``name``: a pure function of the seed and the name."""
    init_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode())))
    return init_key, step_key


TEACHER = "teacher"
# Where the data lives and how its batches are built are not what it is: moving a dataset or loading it with more
# workers does not make its runs stale.
NOT_PART_OF_A_RUN = ("data_dir", "manual_dir", "workers", "threads")


def checkpoint_dir(name: str, workdir: str) -> str:
    return os.path.join(workdir, name, "checkpoints")


def run_config(name: str, settings: dict, config, workdir: str, *, with_teacher: bool) -> dict:
    """The settings that decide run ``name``'s result besides its steps, objective and parameter shapes (which
    ``attrjax.training.train`` records itself): seed, data, the run's own ``settings`` (model or pruning config) and,
    for runs trained against the teacher, the digest of the teacher run they learnt from."""
    data = {key: value for key, value in config.data.to_dict().items() if key not in NOT_PART_OF_A_RUN}
    record = {"run": name, "seed": config.seed, "data": data, "settings": settings}
    if compute_dtype_name(config) != "float32":  # recorded only when not float32: earlier runs stay valid
        record["compute_dtype"] = compute_dtype_name(config)
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
    batches = functools.partial(train_batches, train_split, config)
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
    model = build_model(model_config, config)
    init_key, _ = run_keys(name, config)
    variables = init_model(model, init_key, config)
    if model_config.get("pretrained"):
        variables = pretrained_variables(name, model_config.pretrained, model, variables)
    return model, fit(name, model, variables, model_config.optimizer, objective, model_config.num_steps, config,
                      workdir, train_split, settings=model_config.to_dict(), teacher=teacher,
                      teacher_variables=teacher_variables)


def pretrained_variables(name: str, path: str, model, fresh_variables: dict) -> dict:
    """The convs and BatchNorms of a torchvision-layout state dict (e.g. ImageNet ``vgg16_bn`` or ``resnet50``:
    .pth, .safetensors or .npz) under the fresh classifier of ``fresh_variables``, as the paper builds its teacher."""
    importer = import_vgg if isinstance(model, VGG) else import_resnet
    variables = importer(load_state_dict(path), model, new_head_variables=fresh_variables)
    print(f"[{name}] features from {path}, a new {model.num_classes}-way classifier")
    return variables


def load_trained(name: str, model_config, objective: Objective, config, workdir: str, *, dtype=None) -> tuple:
    """The final variables of a model that ``train_model`` trained into ``workdir/name`` with ``objective``, and
    the model computing in ``dtype`` (default: the one it trained in; evaluation passes float32)."""
    model = build_model(model_config, config, dtype=dtype)
    tx = make_optimizer(model_config.optimizer, model_config.num_steps)
    template = variables_template(model, config)
    return model, restore_finished(name, template, tx, objective, model_config.num_steps, config, workdir,
                                   settings=model_config.to_dict(), with_teacher=name != TEACHER)


def load_teacher(config, workdir: str, *, dtype=None) -> tuple:
    """The trained teacher of ``workdir`` (computing in ``dtype``, as ``load_trained``)."""
    return load_trained(TEACHER, config.teacher, make_objective(config), config, workdir, dtype=dtype)
