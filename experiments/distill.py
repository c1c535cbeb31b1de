"""Distil students from a trained teacher, with and without attribution matching (PAPER.md §5.2).

    python -m experiments.distill --config quick --workdir runs/demo [--set stochastic_drop_rate=0.3]

Needs ``experiments.train_teacher`` to have run in the same work directory.
"""

from __future__ import annotations

import time

import ml_collections

from experiments import common


def student_runs(config) -> dict[str, ml_collections.ConfigDict]:
    """Name -> student config; ``stochastic_drop_rate`` > 0 adds the stochastic-matching student."""
    runs = {name: dict(run) for name, run in config.students.items()}
    if config.stochastic_drop_rate:
        stochastic = dict(runs["kd_match"])
        stochastic["objective"] = dict(stochastic["objective"], drop_rate=config.stochastic_drop_rate)
        runs["kd_match_stochastic"] = stochastic
    return {name: ml_collections.ConfigDict(run) for name, run in runs.items()}


def run(config, workdir: str, splits: dict | None = None) -> dict[str, float]:
    """Trains (or resumes) every student into ``workdir/<name>``; returns the seconds spent per student."""
    splits = common.load_splits(config, workdir) if splits is None else splits
    teacher, teacher_variables = common.load_trained("teacher", config.teacher, config, workdir)
    seconds = {}
    for name, run_config in student_runs(config).items():
        objective = common.make_objective(config, matching_layer=config.matching_layer, **run_config.objective)
        started = time.perf_counter()
        common.train_model(name, run_config, objective, config, workdir, splits["train"], teacher=teacher,
                           teacher_variables=teacher_variables)
        seconds[name] = time.perf_counter() - started
    return seconds


def main():
    common.main_for(run, __doc__)


if __name__ == "__main__":
    main()
