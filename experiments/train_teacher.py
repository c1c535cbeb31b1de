"""Train the full network (the teacher) on the task loss alone (docs/method.md#training-the-teacher).

    python -m experiments.train_teacher --config quick --workdir runs/demo
"""

from __future__ import annotations

import time

from experiments import common


def validate(config) -> None:
    """Raises for a bad teacher setting before anything trains."""
    common.check_config(config)
    common.check_model_run(common.TEACHER, config.teacher, lambda: common.make_objective(config), config)


def run(config, workdir: str, splits: dict | None = None) -> float:
    """Trains (or resumes) the teacher into ``workdir/teacher``; returns the seconds spent."""
    splits = common.load_splits(config, workdir) if splits is None else splits
    started = time.perf_counter()
    common.train_model(common.TEACHER, config.teacher, common.make_objective(config), config, workdir,
                       splits["train"])
    return time.perf_counter() - started


def main():
    common.main_for(run, __doc__, validate)


if __name__ == "__main__":
    main()
