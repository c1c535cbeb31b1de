"""Glue shared by the experiment modules: configs, data, model construction, training one model end to end."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import zlib
from typing import Callable

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from attrjax import data as attr_data
from attrjax.models import VGG, init_variables, vgg
from attrjax.train import Objective, TrainState, checkpoint_manager, make_optimizer, restore_latest, train


def quiet_tfds():
    """Experiments print their own progress: silence TFDS's progress bars and its per-load config warning."""
    tfds.disable_progress_bar()
    absl_logging.set_verbosity(absl_logging.ERROR)


def load_config(name: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """``experiments/configs/<name>.py``'s ``get_config()`` with ``key.sub=value`` overrides (Python literals)."""
    try:
        module = importlib.import_module(f"experiments.configs.{name}")
    except ModuleNotFoundError as error:
        available = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "configs"))
                           if f.endswith(".py") and not f.startswith("_"))
        raise ValueError(f"unknown config {name!r}; available: {available}") from error
    config = module.get_config()
    for override in overrides:
        key, _, text = override.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as data.data_dir=/tmp/x
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}")
        node[leaf] = value
    return config


def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="quick", help="a module of experiments/configs (quick, paper)")
    parser.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and results go")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. "
                        "teacher.num_steps=100")
    return parser


def main_for(run: Callable, doc: str):
    """The command line of an experiment module: ``run(config, workdir)`` with --config, --workdir and --set."""
    args = arg_parser(doc.splitlines()[0]).parse_args()
    run(load_config(args.config, args.set), args.workdir)


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def load_splits(config, workdir: str) -> dict[str, dict[str, np.ndarray]]:
    """Builds the dataset if needed and returns every split as in-memory arrays."""
    quiet_tfds()
    if config.data.name != "shapes":
        raise ValueError(f"dataset {config.data.name!r} has no builder yet; the embedded default is 'shapes'")
    shapes = attr_data.ShapesConfig(**{field.name: config.data[field.name]
                                       for field in dataclasses.fields(attr_data.ShapesConfig)})
    sizes = dict(num_train=config.data.num_train, num_val=config.data.num_val,
                 num_localization=config.data.num_localization, seed=config.seed)
    attr_data.build_shapes(data_dir(config, workdir), shapes=shapes, **sizes)
    return {split: attr_data.load_split(data_dir(config, workdir), split, shapes=shapes, **sizes)
            for split in ("train", "val", "localization")}


def build_model(model_config, config) -> VGG:
    return vgg(model_config.layout, num_classes=config.data.num_classes, image_size=config.data.image_size,
               width_divisor=model_config.width_divisor, attribution_layer=config.matching_layer,
               dropout_rate=model_config.dropout_rate, head_pooling=model_config.head_pooling)


def eval_batches(arrays: dict, config):
    return attr_data.eval_batches(arrays, config.eval.batch_size, normalization=attr_data.SHAPES_NORMALIZATION)


def train_model(name: str, model_config, objective: Objective, config, workdir: str, train_arrays: dict, *,
                teacher: VGG | None = None, teacher_variables: dict | None = None):
    """Trains (or resumes) one model into ``workdir/name`` and returns ``(model, variables, history)``."""
    model = build_model(model_config, config)
    rng = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()))
    init_rng, step_rng = jax.random.split(rng)
    num_steps = model_config.num_steps
    tx = make_optimizer(model_config.optimizer, num_steps)

    def batches(start_step: int):
        return attr_data.train_batches(train_arrays, config.data.batch_size, seed=config.seed, start_step=start_step,
                                       crop_padding=config.data.crop_padding,
                                       normalization=attr_data.SHAPES_NORMALIZATION)

    state, history = train(model, init_variables(model, init_rng), tx, objective, batches, num_steps, rng=step_rng,
                           teacher=teacher, teacher_variables=teacher_variables,
                           checkpoint_dir=os.path.join(workdir, name, "checkpoints"),
                           checkpoint_every=config.checkpoint_every, log_every=config.log_every, name=name)
    return model, jax.device_get(state.variables), history


def save_json(path: str, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def load_trained(name: str, model_config, config, workdir: str) -> tuple[VGG, dict]:
    """The final variables of a model that ``train_model`` trained into ``workdir/name``."""
    model = build_model(model_config, config)
    template = TrainState.create(init_variables(model, jax.random.key(0)),
                                 make_optimizer(model_config.optimizer, model_config.num_steps))
    directory = os.path.join(workdir, name, "checkpoints")
    manager = checkpoint_manager(directory, save_every=config.checkpoint_every)
    if manager.latest_step() != model_config.num_steps:
        raise FileNotFoundError(f"{directory} holds no finished run of {name!r} (latest step "
                                f"{manager.latest_step()}, expected {model_config.num_steps}); train it first")
    return model, jax.device_get(restore_latest(manager, template).variables)
