"""Seeds and grids of the demo: every run of the grid over several seeds, one tidy table, statistics and a report.

    python -m experiments.sweep --workdir runs/sweep --config quick --seeds 5
    python -m experiments.sweep --workdir runs/lambda --seeds 3 --config.runs=kd,kd_match \\
        --grid students.kd_match.objective.matching_weight=0,1,3,10,30,100

Each (grid point, seed) is one demo run (``experiments.demo``) in its own directory ``<point>/seed<k>``: resumable
(a finished run is read back, not retrained; an interrupted one resumes from its checkpoints), and a run that fails
is recorded as failed with its error while the sweep goes on. ``seed`` varies what a user's rerun varies
(initialisation, data order, dropout, stochastic channels); the synthetic dataset is fixed by ``data.seed``, which
can be a grid axis of its own. Runs of one seed whose teacher settings are equal share one teacher.

A sweep never averages runs made with different settings. The sweep directory is bound to its config and grid, and
each run directory to what decides its results: the run's resolved config (so an edited config file or a changed
preset counts) and the code that computed it (the attrjax version and a digest of the attrjax and experiments
sources). Before anything trains, every existing run is checked against what the sweep would run now; a difference
is refused naming the keys, or, with ``--config.on_config_change=restart``, the changed runs are set aside
(``seed<k>.replaced-<digest>``) and run again. More seeds extend a sweep. Grid values are compared as the typed
values they become, so ``10,10.0,1e1`` is refused as one value given three times.

``--reuse OTHER_SWEEP`` evaluates another sweep's trained models (e.g. with more attribution methods) without
training them again. It copies them into this sweep and never writes into the other one.

Writes ``sweep.csv`` / ``sweep.json`` (one row per point, seed, model and attribution method, every metric),
``statistics.json`` and ``report.md`` with figures (``experiments.sweep_report``); every statistic carries the
number of runs behind it. A sweep with failed runs exits with status 1 after writing its report, unless
``--allow-failed`` says to accept that.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import traceback

from jax.experimental.compilation_cache import compilation_cache as persistent_cache

import attrjax
from attrjax import distributed
from attrjax._files import json_digest
from attrjax._locking import DirectoryInUseError, exclusive_directory
from attrjax._progress import Progress
from attrjax.training import RunConfigMismatchError, bind_run_config, check_run_config
from experiments import configuration, demo, models, runs, sweep_report, validation

# Config keys whose change makes another teacher; points that differ only elsewhere share the seed's teacher.
TEACHER_KEYS = ("seed", "data", "teacher")
# Config keys that say how a run is carried out or kept, not what it computes (with ``runs.NOT_PART_OF_A_RUN``).
BOOKKEEPING_KEYS = ("on_config_change", "checkpoint_every", "log_every")
# The packages whose sources compute a run's results.
SOURCE_PACKAGES = (os.path.dirname(attrjax.__file__), os.path.dirname(os.path.dirname(__file__)))


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


@functools.cache
def code_version() -> dict:
    """The code that computes a run: ``{"attrjax": version, "sources": SHA-256}`` of every ``.py`` file of the
    attrjax and experiments packages (by relative path and contents)."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        root = os.path.dirname(package)
        for folder, subfolders, files in sorted(os.walk(package)):
            subfolders.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    return {"attrjax": attrjax.__version__, "sources": digest.hexdigest()}


def run_record(config) -> dict:
    """What a sweep run's results depend on, and its directory is bound to: the resolved config (less where the
    data lives, how batches are loaded and how the run is kept) and ``code_version()``."""
    settings = {key: value for key, value in config.to_dict().items() if key not in BOOKKEEPING_KEYS}
    settings["data"] = {key: value for key, value in settings["data"].items() if key not in runs.NOT_PART_OF_A_RUN}
    return {"config": settings, "code": code_version()}


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
    return configuration.load_config(config_name, [*overrides, *(f"{key}={value}" for key, value in point.items()),
                                                   f"seed={seed}"])


def teacher_key(config) -> str:
    """What decides the teacher's run, as a short digest: configs with the same key share a teacher."""
    settings = {key: config[key].to_dict() if hasattr(config[key], "to_dict") else config[key]
                for key in TEACHER_KEYS}
    settings["data"] = {k: v for k, v in settings["data"].items() if k not in runs.NOT_PART_OF_A_RUN}
    if models.compute_dtype_name(config) != "float32":  # as in the run records: float32 keys stay what they were
        settings["compute_dtype"] = models.compute_dtype_name(config)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def share_teacher(config, teachers_dir: str, run_dir: str) -> None:
    """Makes ``run_dir/teacher`` a link to the one teacher directory of every run with this teacher key, so the
    seed's teacher trains once; the teacher's own run record still guards what it was trained with."""
    shared = os.path.join(teachers_dir, f"{teacher_key(config)}-seed{config.seed}")
    os.makedirs(shared, exist_ok=True)
    link = os.path.join(run_dir, runs.TEACHER)
    if not os.path.lexists(link):
        os.symlink(os.path.relpath(shared, run_dir), link)


def reuse_trained(source_run_dir: str, run_dir: str) -> None:
    """Copies every trained model of ``source_run_dir`` (another sweep's run of the same point and seed) into
    ``run_dir``, so this run only evaluates; each model's run record still refuses settings it was not trained
    with, so only the evaluation settings may differ. A copy, not a link: whatever this run does to its models
    (resume, restart, new curves) never reaches the other sweep."""
    if not os.path.isdir(source_run_dir):
        raise FileNotFoundError(f"{source_run_dir} does not exist: --reuse needs a sweep with the same grid points "
                                "and at least as many seeds")
    for name in sorted(os.listdir(source_run_dir)):
        source, target = os.path.join(source_run_dir, name), os.path.join(run_dir, name)
        if os.path.isdir(source) and not os.path.lexists(target):
            shutil.copytree(os.path.realpath(source), target + ".partial", dirs_exist_ok=True)
            os.replace(target + ".partial", target)  # a copy cut short is redone, never taken for a whole one


def sweep_record(config_name: str, overrides: list[str], grid: dict) -> dict:
    """What a sweep directory is bound to (the seed count is not: more seeds extend a sweep; nor are overrides of
    how runs are kept, such as ``on_config_change``, which its runs' own records leave out too)."""
    kept = [override for override in overrides if override.partition("=")[0] not in BOOKKEEPING_KEYS]
    return {"config": config_name, "overrides": kept, "grid": grid}


def check_unchanged(configs: dict, run_dirs: dict) -> None:
    """Raises ``RunConfigMismatchError`` (naming the differing keys) for the first existing run directory whose
    record differs from what its config would run now, before anything trains (``on_config_change="refuse"``)."""
    for key, config in configs.items():
        if os.path.isdir(run_dirs[key]) and config.on_config_change == "refuse":
            check_run_config(run_dirs[key], run_record(config))


def check_distinct_points(configs: dict) -> None:
    """Raises when two grid points give the same runs (e.g. ``10`` and ``10.0``: one value once typed)."""
    seen: dict[str, str] = {}
    for (name, seed), config in configs.items():
        digest = json_digest(run_record(config)["config"])
        if seed == 0 and digest in seen:
            raise ValueError(f"grid points {seen[digest]} and {name} are the same config once their values are "
                             "typed (e.g. 10, 10.0 and 1e1 are one number): list each value once")
        seen.setdefault(digest, name)


def run_one(config, run_dir: str, *, sweep_dir: str, teachers_dir: str, reuse_dir: str | None = None,
            log=print) -> dict:
    """One demo run into ``run_dir`` (its output in ``run_dir/log.txt``): ``{"status", "results" | "error",
    "seconds"}`` with status ``finished`` (read back from an earlier sweep), ``ran`` or ``failed``.

    ``run_dir`` is bound to ``run_record(config)`` first: results are read back only from a run made with the same
    settings and code (``config.on_config_change`` decides what a changed run does)."""
    bind_run_config(run_dir, run_record(config), on_config_change=config.on_config_change, log=log)
    results_path = os.path.join(run_dir, "results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            return {"status": "finished", "results": json.load(f)["results"], "seconds": 0.0}
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
    validation.check_count("seeds", seeds)
    points = grid_points(grid)
    base = point_config(config_name, overrides, {}, 0)
    configs = {}
    for point in points:  # every point is validated before the first run trains
        for seed in range(seeds):
            configs[point_name(point), seed] = config = point_config(config_name, overrides, point, seed)
            demo.validate(config)
    check_distinct_points(configs)
    run_dirs = {(name, seed): os.path.join(sweep_dir, name, f"seed{seed}") for name, seed in configs}
    with exclusive_directory(sweep_dir):
        bind_run_config(sweep_dir, sweep_record(config_name, overrides, grid), on_config_change=base.on_config_change,
                        log=log)
        check_unchanged(configs, run_dirs)
        outcomes = _run_all(configs, run_dirs, sweep_dir=sweep_dir, teachers_dir=teachers_dir, reuse=reuse,
                            compilation_cache=compilation_cache, log=log)
        rows = sweep_report.tidy_rows(outcomes, {point_name(point): point for point in points})
        sweep_report.write(sweep_dir, rows, grid=grid, command=command or "experiments.sweep.run_sweep", log=log)
    return rows


def _run_all(configs: dict, run_dirs: dict, *, sweep_dir: str, teachers_dir: str, reuse: str | None,
             compilation_cache: bool, log) -> dict:
    """``{(point name, seed): outcome}`` of every run, one after another, with progress lines."""
    if compilation_cache:  # identical programs of all runs compile once; inside the bound directory
        persistent_cache.set_cache_dir(os.path.abspath(os.path.join(sweep_dir, "jax_cache")))
        persistent_cache.reset_cache()  # a cache this process opened before would otherwise stay in use
    outcomes = {}
    with Progress(len(configs), description="[sweep] run", unit="run") as progress:
        for (name, seed), config in configs.items():
            outcome = run_one(config, run_dirs[name, seed], sweep_dir=sweep_dir, teachers_dir=teachers_dir,
                              reuse_dir=None if reuse is None else os.path.join(reuse, name, f"seed{seed}"), log=log)
            outcomes[name, seed] = outcome
            ran = outcome["status"] != "finished"  # "finished": read back from an earlier sweep, nothing ran
            log(f"[sweep] {name} seed {seed}: {outcome['status']}"
                + (f" in {outcome['seconds'] / 60:.1f} min" if ran else "")
                + (f" ({outcome['error']})" if outcome["status"] == "failed" else "")
                + f" [{progress.step(timed=ran)}]")
    return outcomes


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
    configuration.add_config_arguments(parser)
    parser.add_argument("--workdir", default="runs/sweep", help="the sweep directory")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 of every grid point")
    parser.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="grid axes (their product)")
    parser.add_argument("--reuse", default=None, help="another sweep directory (same grid) whose trained models "
                        "this sweep evaluates, e.g. with --config.eval.methods=paper")
    parser.add_argument("--teachers", default=None, help="where the shared teachers live (default WORKDIR/teachers; "
                        "another sweep's teachers directory reuses its teachers)")
    parser.add_argument("--allow-failed", action="store_true", help="exit with status 0 even when runs failed "
                        "(their points' statistics are then over fewer seeds, as the report says)")
    parser.epilog = "Override any config value of every run with --config.KEY=VALUE, e.g. --config.runs=kd,kd_match."
    args, overrides = configuration.parse_with_overrides(parser, argv)
    try:
        check_single_process()
        command = "python -m experiments.sweep " + " ".join(sys.argv[1:] if argv is None else argv)
        rows = run_sweep(args.config, overrides, parse_grid(args.grid), args.seeds, args.workdir,
                         compilation_cache=True, teachers_dir=args.teachers, reuse=args.reuse, command=command)
    except RunConfigMismatchError as error:
        sys.exit(f"error: {error}\n(to run the changed runs again: --config.on_config_change=restart, or a new "
                 "--workdir)")
    except (ValueError, FileNotFoundError, DirectoryInUseError) as error:
        sys.exit(f"error: {error}")
    failed = sweep_report.failed_runs(rows)
    if failed and not args.allow_failed:
        sys.exit(f"error: {len(failed)} run(s) failed ({', '.join(f'{p} seed {s}' for p, s in failed)}); the report "
                 f"in {args.workdir} gives their points' statistics over the seeds that finished. Rerun the same "
                 "command to retry them, or pass --allow-failed to accept the report as it is")


if __name__ == "__main__":
    main()
