"""Train the full network (the teacher) on the task loss alone (docs/method.md#training-the-teacher).

    python -m experiments.train_teacher --config quick --workdir runs/demo
"""

from __future__ import annotations

import time

from experiments import datasets, models, runs, validation


def validate(config) -> None:
    """Raises for a bad teacher setting before anything trains."""
    validation.check_config(config)
    validation.check_model_run(runs.TEACHER, config.teacher, lambda: models.make_objective(config), config)


def run(config, workdir: str, splits: dict | None = None) -> float:
    """Trains (or resumes) the teacher into ``workdir/teacher``; returns the seconds spent."""
    splits = datasets.load_splits(config, workdir) if splits is None else splits
    started = time.perf_counter()
    runs.train_model(runs.TEACHER, config.teacher, models.make_objective(config), config, workdir,
                     splits["train"])
    return time.perf_counter() - started


def main():
    runs.main_for(run, __doc__, validate)


if __name__ == "__main__":
    main()
