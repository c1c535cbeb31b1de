"""Distil students from a trained teacher, with and without attribution matching (docs/method.md#distilled-students).

    python -m experiments.distill --config quick --workdir runs/demo [--config.stochastic_drop_rate=0.3]

Needs ``experiments.train_teacher`` to have run in the same work directory.
"""

from __future__ import annotations

import functools
import time

import ml_collections

from attrjax.models import VGG, check_compatible
from experiments import datasets, models, runs, validation


def student_runs(config, *, chosen: bool = True) -> dict[str, ml_collections.ConfigDict]:
    """Name -> student config; ``stochastic_drop_rate`` > 0 adds the stochastic-matching student. ``chosen``: only
    the runs ``config.runs`` names."""
    table = {name: dict(run) for name, run in config.students.items()}
    if config.stochastic_drop_rate:
        stochastic = dict(table["kd_match"])
        stochastic["objective"] = dict(stochastic["objective"], drop_rate=config.stochastic_drop_rate)
        table["kd_match_stochastic"] = stochastic
    return validation.run_table(config, table, chosen=chosen)


def validate(config) -> None:
    """Raises for a bad setting of any student before the first one trains."""
    validation.check_config(config)
    teacher = models.build_model(config.teacher, config)
    for name, run_config in student_runs(config).items():
        objective = functools.partial(models.compression_objective, config, run_config)
        student = validation.check_model_run(name, run_config, objective, config)
        try:
            if isinstance(teacher, VGG) and isinstance(student, VGG):
                check_compatible(teacher, student, [config.matching_layer] if objective().matching else [])
            elif objective().matching:
                for role, model in (("teacher", teacher), ("student", student)):
                    models.check_layer(role, model, config.matching_layer, config)
        except ValueError as error:
            raise ValueError(f"settings of the {name!r} run: {error}") from error


def run(config, workdir: str, splits: dict | None = None) -> dict[str, float]:
    """Trains (or resumes) every student into ``workdir/<name>``; returns the seconds spent per student."""
    splits = datasets.load_splits(config, workdir) if splits is None else splits
    teacher, teacher_variables = runs.load_teacher(config, workdir)
    seconds = {}
    for name, run_config in student_runs(config).items():
        objective = models.compression_objective(config, run_config)
        started = time.perf_counter()
        runs.train_model(name, run_config, objective, config, workdir, splits["train"], teacher=teacher,
                         teacher_variables=teacher_variables)
        seconds[name] = time.perf_counter() - started
    return seconds


def main():
    runs.main_for(run, __doc__, validate)


if __name__ == "__main__":
    main()
