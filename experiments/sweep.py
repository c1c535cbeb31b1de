"""Seeds and grids of the demo: every run of the grid over several seeds, one tidy table, statistics and a report.

    python -m experiments.sweep --workdir runs/sweep --config quick --seeds 5
    python -m experiments.sweep --workdir runs/lambda --seeds 3 --config.runs=kd,kd_match \\
        --grid students.kd_match.objective.matching_weight=0,1,3,10,30,100

Each (grid point, seed) is one demo run (``experiments.demo``) in its own directory ``<point>/seed<k>``: resumable
(a finished run is read back, not retrained; an interrupted one resumes from its checkpoints), and a run that fails
is recorded as failed with its error while the sweep goes on. ``seed`` varies what a user's rerun varies
(initialisation, data order, dropout, stochastic channels); the synthetic dataset is fixed by ``data.seed``, which
can be a grid axis of its own. Runs of one seed whose teacher settings are equal share one teacher. The sweep
directory is bound to its config and grid (``on_config_change`` as for single runs); more seeds extend it.

``--reuse OTHER_SWEEP`` evaluates another sweep's trained models (e.g. with more attribution methods) without
training them again.

Writes ``sweep.csv`` / ``sweep.json`` (one row per point, seed, model and attribution method, every metric),
``statistics.json`` and ``report.md`` with figures (``experiments.sweep_report``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
import traceback

from jax.experimental.compilation_cache import compilation_cache as persistent_cache

from attrjax import distributed
from attrjax.progress import Progress
from attrjax.train import RunConfigMismatchError, bind_run_config
from experiments import common, demo, sweep_report

# Config keys whose change makes another teacher; points that differ only elsewhere share the seed's teacher.
TEACHER_KEYS = ("seed", "data", "teacher")


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["key=v1,v2", ...]`` -> ``{key: ["v1", "v2"]}`` (values stay text, parsed as ``--config.KEY=VALUE``'s)."""
    grid = {}
    for spec in specs:
        key, equals, values = spec.partition("=")
        if not equals or not key or not values:
            raise ValueError(f"grid axis {spec!r} is not KEY=V1,V2,... (e.g. "
                             "students.kd_match.objective.matching_weight=0,10,100)")
        if key in grid:
            raise ValueError(f"grid key {key!r} is given twice; list all its values once")
        grid[key] = [value.strip() for value in values.split(",")]
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in order; one empty point without a grid."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_name(point: dict[str, str]) -> str:
    """A directory name for a grid point: its last key components and values (``matching_weight=10``)."""
    if not point:
        return "base"
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in point.items()).replace("/", "_")


def point_config(config_name: str, overrides: list[str], point: dict[str, str], seed: int):
    """The config of one run; bad keys and values of the wrong type fail here, with the config's own errors."""
    return common.load_config(config_name, [*overrides, *(f"{key}={value}" for key, value in point.items()),
                                            f"seed={seed}"])


def teacher_key(config) -> str:
    """What decides the teacher's run, as a short digest: configs with the same key share a teacher."""
    settings = {key: config[key].to_dict() if hasattr(config[key], "to_dict") else config[key]
                for key in TEACHER_KEYS}
    settings["data"] = {k: v for k, v in settings["data"].items() if k not in common.NOT_PART_OF_A_RUN}
    if common.compute_dtype_name(config) != "float32":  # as in the run records: float32 keys stay what they were
        settings["compute_dtype"] = common.compute_dtype_name(config)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def share_teacher(config, teachers_dir: str, run_dir: str) -> None:
    """Makes ``run_dir/teacher`` a link to the one teacher directory of every run with this teacher key, so the
    seed's teacher trains once; the teacher's own run record still guards what it was trained with."""
    shared = os.path.join(teachers_dir, f"{teacher_key(config)}-seed{config.seed}")
    os.makedirs(shared, exist_ok=True)
    link = os.path.join(run_dir, common.TEACHER)
    if not os.path.lexists(link):
        os.symlink(os.path.relpath(shared, run_dir), link)


def reuse_trained(source_run_dir: str, run_dir: str) -> None:
    """Links every trained model of ``source_run_dir`` (another sweep's run of the same point and seed) into
    ``run_dir``, so this run only evaluates; each model's run record still refuses settings it was not trained
    with, so only the evaluation settings may differ."""
    if not os.path.isdir(source_run_dir):
        raise FileNotFoundError(f"{source_run_dir} does not exist: --reuse needs a sweep with the same grid points "
                                "and at least as many seeds")
    for name in sorted(os.listdir(source_run_dir)):
        source = os.path.join(source_run_dir, name)
        if os.path.isdir(source) and not os.path.lexists(os.path.join(run_dir, name)):
            os.symlink(os.path.relpath(os.path.realpath(source), run_dir), os.path.join(run_dir, name))


def sweep_record(config_name: str, overrides: list[str], grid: dict) -> dict:
    """What a sweep directory is bound to (the seed count is not: more seeds extend a sweep)."""
    return {"config": config_name, "overrides": list(overrides), "grid": grid}


def run_one(config, run_dir: str, *, sweep_dir: str, teachers_dir: str, reuse_dir: str | None = None) -> dict:
    """One demo run into ``run_dir`` (its output in ``run_dir/log.txt``): ``{"status", "results" | "error",
    "seconds"}`` with status ``finished`` (read back from an earlier sweep), ``ran`` or ``failed``."""
    results_path = os.path.join(run_dir, "results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            return {"status": "finished", "results": json.load(f)["results"], "seconds": 0.0}
    os.makedirs(run_dir, exist_ok=True)
    config.data.data_dir = config.data.data_dir or os.path.join(sweep_dir, "data")  # one copy of each dataset
    if reuse_dir is not None:
        reuse_trained(reuse_dir, run_dir)
    share_teacher(config, teachers_dir, run_dir)
    started = time.perf_counter()
    with open(os.path.join(run_dir, "log.txt"), "a", buffering=1) as log, contextlib.redirect_stdout(log):
        try:
            results = demo.run(config, run_dir)
        except RunConfigMismatchError:
            raise  # a run directory with other settings: the whole sweep's choice, not one run's failure
        except Exception as error:  # noqa: BLE001 - any failure of one run is reported, and the sweep goes on
            traceback.print_exc(file=log)
            return {"status": "failed", "error": f"{type(error).__name__}: {error}",
                    "seconds": time.perf_counter() - started}
    return {"status": "ran", "results": results, "seconds": time.perf_counter() - started}


def run_sweep(config_name: str, overrides: list[str], grid: dict[str, list[str]], seeds: int, sweep_dir: str, *,
              log=print, command: str | None = None, compilation_cache: bool = False,
              teachers_dir: str | None = None, reuse: str | None = None) -> list[dict]:
    """Runs (or reads back) every (grid point, seed) and writes the table, statistics and report; returns the
    tidy rows. ``teachers_dir`` (default ``<sweep_dir>/teachers``) holds the shared teachers: sweeps given the same
    one share their seeds' teachers too. ``reuse``: another sweep directory whose trained models this one
    evaluates (e.g. with other attribution methods) instead of training its own."""
    teachers_dir = os.path.join(sweep_dir, "teachers") if teachers_dir is None else teachers_dir
    common.check_count("seeds", seeds)
    points = grid_points(grid)
    base = point_config(config_name, overrides, {}, 0)
    configs = {}
    for point in points:  # every point is validated before the first run trains
        for seed in range(seeds):
            configs[point_name(point), seed] = config = point_config(config_name, overrides, point, seed)
            demo.validate(config)
    os.makedirs(sweep_dir, exist_ok=True)
    bind_run_config(sweep_dir, sweep_record(config_name, overrides, grid), on_config_change=base.on_config_change,
                    log=log)
    if compilation_cache:  # identical programs of all runs compile once; inside the bound directory
        persistent_cache.set_cache_dir(os.path.abspath(os.path.join(sweep_dir, "jax_cache")))
        persistent_cache.reset_cache()  # a cache this process opened before would otherwise stay in use
    outcomes = {}
    with Progress(len(configs), description="[sweep] run", unit="run") as progress:
        for (name, seed), config in configs.items():
            outcome = run_one(config, os.path.join(sweep_dir, name, f"seed{seed}"), sweep_dir=sweep_dir,
                              teachers_dir=teachers_dir,
                              reuse_dir=None if reuse is None else os.path.join(reuse, name, f"seed{seed}"))
            outcomes[name, seed] = outcome
            ran = outcome["status"] != "finished"  # "finished": read back from an earlier sweep, nothing ran
            log(f"[sweep] {name} seed {seed}: {outcome['status']}"
                + (f" in {outcome['seconds'] / 60:.1f} min" if ran else "")
                + (f" ({outcome['error']})" if outcome["status"] == "failed" else "")
                + f" [{progress.step(timed=ran)}]")
    rows = sweep_report.tidy_rows(outcomes, {point_name(point): point for point in points})
    sweep_report.write(sweep_dir, rows, grid=grid, command=command or "experiments.sweep.run_sweep", log=log)
    return rows


def check_single_process() -> None:
    """Raises when this process was started as one of several (a cluster manager's tasks, or a coordinator given):
    a sweep runs its runs one after another in one process and would otherwise run every run once per process,
    all writing the same files."""
    launcher = distributed.detected_cluster() or (os.environ.get(distributed.COORDINATOR_ENV) and "a coordinator")
    if launcher:
        raise ValueError(f"experiments.sweep runs in a single process, but this one was started as one of several "
                         f"({launcher}). Start the sweep as one process, or run each (grid point, seed) across the "
                         "processes as its own `python -m experiments.demo --config.seed=K ...`")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_config_arguments(parser)
    parser.add_argument("--workdir", default="runs/sweep", help="the sweep directory")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 of every grid point")
    parser.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="grid axes (their product)")
    parser.add_argument("--reuse", default=None, help="another sweep directory (same grid) whose trained models "
                        "this sweep evaluates, e.g. with --config.eval.methods=paper")
    parser.add_argument("--teachers", default=None, help="where the shared teachers live (default WORKDIR/teachers; "
                        "another sweep's teachers directory reuses its teachers)")
    parser.epilog = "Override any config value of every run with --config.KEY=VALUE, e.g. --config.runs=kd,kd_match."
    args, overrides = common.parse_with_overrides(parser, argv)
    try:
        check_single_process()
        command = "python -m experiments.sweep " + " ".join(sys.argv[1:] if argv is None else argv)
        run_sweep(args.config, overrides, parse_grid(args.grid), args.seeds, args.workdir, compilation_cache=True,
                  teachers_dir=args.teachers, reuse=args.reuse, command=command)
    except RunConfigMismatchError as error:
        sys.exit(f"error: {error}\n(to start this sweep afresh: --config.on_config_change=restart, or a new --workdir)")
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
