"""Checking an experiment config before anything runs: counts and fractions, the settings every experiment module
shares, one model run's training settings, and the runs ``config.runs`` chooses."""

from __future__ import annotations

from typing import Callable

from attrjax.training import Objective, make_optimizer
from attrjax.training._run_config import check_on_config_change
import ml_collections

from experiments import datasets, models


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
    models.compute_dtype(config)
    if config.data.name == "shapes":
        check_count("data.seed", config.data.seed, minimum=0)
    if not isinstance(config.runs, str):
        raise ValueError(f"runs must be a string of comma-separated run names ('' for all), got {config.runs!r}")
    datasets.normalization(config)  # an unknown dataset name fails here
    if config.data.labels not in ("multilabel", "single"):
        raise ValueError(f"data.labels must be 'multilabel' or 'single', got {config.data.labels!r}")
    check_on_config_change(config.on_config_change)


def check_model_run(name: str, model_config, objective_fn: Callable[[], Objective], config):
    """Validates one model's training settings without training it (model, steps, optimizer, objective); returns
    the model. ``objective_fn`` builds the objective, whose constructor checks it."""
    try:
        check_count("num_steps", model_config.num_steps)
        make_optimizer(model_config.optimizer, model_config.num_steps)
        objective_fn()
        return models.build_model(model_config, config)
    except (ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"settings of the {name!r} run: {error}") from error


def _run_names(config) -> list[str]:
    return [name.strip() for name in config.runs.split(",") if name.strip()]


def chosen_runs(config, runs: dict) -> dict:
    """The entries of ``runs`` (name -> run config) that ``config.runs`` names; all of them when it is empty."""
    names = _run_names(config)
    return {name: run for name, run in runs.items() if not names or name in names}


def run_table(config, table: dict[str, dict], *, chosen: bool) -> dict[str, ml_collections.ConfigDict]:
    """Name -> run settings (plain dicts) as ConfigDicts; with ``chosen``, only the runs ``config.runs`` names."""
    runs = {name: ml_collections.ConfigDict(run) for name, run in table.items()}
    return chosen_runs(config, runs) if chosen else runs


def check_chosen_runs(config, available) -> None:
    """Raises if ``config.runs`` names a run that is not among ``available``."""
    unknown = [name for name in _run_names(config) if name not in available]
    if unknown:
        raise ValueError(f"runs names unknown runs {unknown}; this config has: {', '.join(available)}")
