"""A tiny sweep end to end (2 seeds x 2 grid points, the KD pair only): runs, resumes, shares the seed's teacher,
reports failures, and its statistics equal a hand computation from its own rows."""

import csv
import json
import math
import os

import numpy as np
import pytest

from attrjax.training import RunConfigMismatchError
from experiments import sweep, sweep_report
from tests.test_experiments import TINY

SETTINGS = [*(s for s in TINY if not s.startswith(("eval.", "checkpoint_every", "log_every"))),
            "eval.batch_size=8", "eval.methods=gradcam", "eval.figure_images=0", "runs=kd,kd_match"]
GRID = {"students.kd_match.objective.matching_weight": ["0.0", "10.0"]}


@pytest.mark.slow
def test_a_tiny_sweep_runs_resumes_and_reports(tmp_path):
    lines = []
    rows = sweep.run_sweep("quick", SETTINGS, GRID, 2, str(tmp_path), log=lines.append, command="tiny")
    points = ["matching_weight=0.0", "matching_weight=10.0"]
    assert sorted({(row["point"], row["seed"]) for row in rows}) == [(p, s) for p in points for s in (0, 1)]
    assert {row["model"] for row in rows} == {"teacher", "kd", "kd_match"}
    assert all(row["status"] == "ran" for row in rows)
    assert lines[-2].endswith("[4/4]") and lines[0].endswith("left]")
    # One teacher per seed, shared by both points: its variables are the same file.
    links = [os.path.realpath(tmp_path / p / "seed0" / "teacher") for p in points]
    assert links[0] == links[1] and len(os.listdir(tmp_path / "teachers")) == 2
    teacher_rows = [r for r in rows if r["model"] == "teacher" and r["seed"] == 0]
    assert teacher_rows[0]["sample_map"] == teacher_rows[1]["sample_map"]

    # The statistics against a hand computation on the rows: a t interval and a paired difference.
    stats = json.loads((tmp_path / "statistics.json").read_text())
    cosine = {(r["point"], r["model"], r["seed"]): r["map_cosine"] for r in rows}
    matched = [cosine[points[1], "kd_match", s] for s in (0, 1)]
    naive = [cosine[points[1], "kd", s] for s in (0, 1)]
    entry = next(e for e in stats["models"] if e["point"] == points[1] and e["model"] == "kd_match"
                 and e["metric"] == "map_cosine")
    half = 12.706204736174707 * np.std(matched, ddof=1) / math.sqrt(2)  # t(0.975, 1 dof)
    np.testing.assert_allclose([entry["low"], entry["high"]], [np.mean(matched) - half, np.mean(matched) + half])
    difference = next(e for e in stats["differences"] if e["point"] == points[1] and e["metric"] == "map_cosine")
    np.testing.assert_allclose(difference["mean"], np.mean(np.subtract(matched, naive)))
    assert difference["positive"] + difference["negative"] <= 2 and difference["setting"] == "kd"
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 12
    report = (tmp_path / "report.md").read_text()
    assert "Made by `tiny`" in report and "| kd_match |" in report and "distinguishable from 0" in report
    for figure in ("tradeoff.png", "bars_matching_weight-10.0_gradcam.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"

    # A rerun reads every finished run back; a run that fails is reported and the sweep goes on.
    (tmp_path / points[0] / "seed1" / "results.json").unlink()
    (tmp_path / points[0] / "seed1" / "kd_match" / "checkpoints").rename(tmp_path / "moved")
    (tmp_path / points[0] / "seed1" / "kd_match" / "checkpoints").write_text("not a directory")
    lines.clear()
    again = sweep.run_sweep("quick", SETTINGS, GRID, 2, str(tmp_path), log=lines.append, command="tiny",
                            compilation_cache=True)  # from here on, programs compile into the sweep's own cache
    statuses = [line.split(": ")[1].split()[0].rstrip(";") for line in lines[:4]]
    assert statuses == ["finished", "failed", "finished", "finished"]
    failed = [row for row in again if row["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["seed"] == 1 and "Error" in failed[0]["error"]
    assert "1 run(s) failed" in (tmp_path / "report.md").read_text()

    # Another sweep evaluates the trained models of one point with more methods and trains nothing.
    lines.clear()
    other = tmp_path.parent / f"{tmp_path.name}-saliency"
    one_point = {key: values[1:] for key, values in GRID.items()}
    evaluated = sweep.run_sweep("quick", [*SETTINGS, "eval.methods=gradcam,saliency"], one_point, 1, str(other),
                                log=lines.append, reuse=str(tmp_path))
    assert os.listdir(tmp_path / "jax_cache")  # the evaluation's programs
    assert {row["method"] for row in evaluated} == {"gradcam", "saliency"}
    log = (other / points[1] / "seed0" / "log.txt").read_text()
    assert "resuming from the checkpoint of step 3" in log and "] step " not in log
    reused = {(r["model"], r["method"]): r["map_cosine"] for r in evaluated if r["point"] == points[1]}
    assert reused["kd_match", "gradcam"] == cosine[points[1], "kd_match", 0]


def test_bad_sweeps_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="not KEY=V1,V2"):
        sweep.parse_grid(["students.kd_match.objective.matching_weight"])
    with pytest.raises(ValueError, match="unknown config key 'students.kd_match.objective.matching_wieght'"):
        sweep.run_sweep("quick", SETTINGS, {"students.kd_match.objective.matching_wieght": ["1"]}, 1, str(tmp_path))
    with pytest.raises(ValueError, match="config key 'teacher.num_steps' is of type int: .*'many'"):
        sweep.run_sweep("quick", SETTINGS, {"teacher.num_steps": ["many"]}, 1, str(tmp_path))
    with pytest.raises(ValueError, match="runs names unknown runs \\['kd_mach'\\]"):
        sweep.run_sweep("quick", [*SETTINGS[:-1], "runs=kd_mach"], {}, 1, str(tmp_path))
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        sweep.run_sweep("quick", SETTINGS, {}, 0, str(tmp_path))
    assert os.listdir(tmp_path) == []
    sweep.bind_run_config(str(tmp_path), sweep.sweep_record("quick", SETTINGS, GRID))
    with pytest.raises(RunConfigMismatchError, match="grid"):  # a directory of another sweep
        sweep.run_sweep("quick", SETTINGS, {}, 1, str(tmp_path))


def test_a_sweep_started_as_one_of_several_processes_is_refused(monkeypatch, capsys):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES",
                 "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    sweep.check_single_process()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(SystemExit, match=r"single process, but this one was started as one of several \(a coord"):
        sweep.main(["--workdir", "unused"])
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(ValueError, match=r"\(slurm\)\. Start the sweep as one process"):
        sweep.check_single_process()


def test_model_names_map_to_settings_and_variants():
    assert sweep_report.setting_and_variant("kd_match_stochastic") == ("kd", "stochastic")
    assert sweep_report.setting_and_variant("structured_match") == ("structured", "matched")
    assert sweep_report.setting_and_variant("unstructured") == ("unstructured", "naive")
    assert sweep_report.setting_and_variant("teacher") == ("teacher", "teacher")


def _fake_demo(monkeypatch, fail_seeds=()):
    """``demo.run`` replaced by one that trains nothing: it writes a model directory and results.json as a run
    does, records which runs it made, and fails for ``fail_seeds``."""
    calls = []

    def run(config, workdir):
        calls.append((workdir, config.students.kd.objective.temperature))
        if config.seed in fail_seeds:
            raise RuntimeError(f"seed {config.seed} broke")
        os.makedirs(os.path.join(workdir, "kd", "checkpoints"), exist_ok=True)
        with open(os.path.join(workdir, "kd", "checkpoints", "weights"), "a") as f:
            f.write(f"trained by {workdir}\n")
        summary = {"map_cosine": 0.5 + 0.1 * config.seed, "pointing_accuracy": 0.7}
        results = {"teacher": {"sample_map": 0.9, "methods": {"gradcam": summary}},
                   "kd": {"sample_map": 0.8 + 0.01 * config.seed, "methods": {"gradcam": summary}}}
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"results": results}, f)
        return results

    monkeypatch.setattr(sweep.demo, "run", run)
    return calls


def _config_file(path, temperature):
    path.write_text("from experiments.configs import quick\n\n\ndef get_config():\n    config = quick.get_config()\n"
                    f"    config.students.kd.objective.temperature = {temperature}\n    return config\n")
    return str(path)


def test_a_sweep_never_reads_back_runs_made_with_other_settings_or_code(tmp_path, monkeypatch):
    calls = _fake_demo(monkeypatch)
    config_path, sweep_dir, lines = _config_file(tmp_path / "mine.py", 4.0), str(tmp_path / "sweep"), []
    sweep.run_sweep(config_path, SETTINGS, {}, 2, sweep_dir, log=lines.append)
    assert [temperature for _, temperature in calls] == [4.0, 4.0]
    # The config file is edited, then the sweep extended: refused before anything runs, naming the key.
    _config_file(tmp_path / "mine.py", 2.0)
    with pytest.raises(RunConfigMismatchError, match=r"students\.kd\.objective\.temperature: 4\.0 -> 2\.0"):
        sweep.run_sweep(config_path, SETTINGS, {}, 3, sweep_dir, log=lines.append)
    assert len(calls) == 2
    # A code update (a preset or the library changed): refused as well, naming the code.
    _config_file(tmp_path / "mine.py", 4.0)
    monkeypatch.setattr(sweep, "code_version", lambda: {"attrjax": "0.1.0", "sources": "changed"})
    with pytest.raises(RunConfigMismatchError, match=r"code\.sources"):
        sweep.run_sweep(config_path, SETTINGS, {}, 2, sweep_dir, log=lines.append)
    # Restart runs the changed runs again and sets the old ones aside; the report is over the new runs only.
    rows = sweep.run_sweep(config_path, [*SETTINGS, "on_config_change=restart"], {}, 2, sweep_dir, log=lines.append)
    assert len(calls) == 4 and {row["status"] for row in rows} == {"ran"}
    assert sorted(os.listdir(os.path.join(sweep_dir, "base"))) == [
        "seed0", "seed0.replaced-" + _digest(sweep_dir, "seed0.replaced-"), "seed1",
        "seed1.replaced-" + _digest(sweep_dir, "seed1.replaced-")]


def _digest(sweep_dir, prefix):
    (name,) = [n for n in os.listdir(os.path.join(sweep_dir, "base")) if n.startswith(prefix)]
    return name[len(prefix):]


def test_a_reusing_sweep_copies_the_other_sweeps_models_and_never_writes_into_it(tmp_path, monkeypatch):
    _fake_demo(monkeypatch)
    source, other = str(tmp_path / "a"), str(tmp_path / "b")
    sweep.run_sweep("quick", SETTINGS, {}, 1, source, log=lambda _: None)
    before = {path: open(path, "rb").read() for path in _files(source)}
    sweep.run_sweep("quick", [*SETTINGS, "eval.tolerance=1"], {}, 1, other, reuse=source, log=lambda _: None)
    copied = os.path.join(other, "base", "seed0", "kd")
    assert not os.path.islink(copied)
    assert open(os.path.join(copied, "checkpoints", "weights")).read().count("trained by") == 2  # copied, then ran
    assert {path: open(path, "rb").read() for path in _files(source)} == before


def _files(directory):
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(directory) for name in names
                  if not name.startswith("."))


def test_a_partial_sweep_says_how_many_seeds_it_has_and_exits_non_zero(tmp_path, monkeypatch):
    _fake_demo(monkeypatch, fail_seeds=(1,))
    rows = sweep.run_sweep("quick", SETTINGS, {}, 3, str(tmp_path), log=lambda _: None, command="partial")
    assert sweep_report.failed_runs(rows) == [("base", 1)]
    report = (tmp_path / "report.md").read_text()
    assert "# Sweep: 3 seeds; 1 of 3 runs failed" in report and "**2 of 3 seeds finished**" in report
    assert "| kd | 0.81 [" in report and "(n=2)" in report  # every cell over 2 of the 3 seeds says so
    stats = json.loads((tmp_path / "statistics.json").read_text())
    entry = next(e for e in stats["models"] if e["model"] == "kd" and e["metric"] == "map_cosine")
    assert (entry["n"], entry["n_undefined"]) == (2, 1) and math.isclose(entry["mean"], 0.6)

    monkeypatch.setattr(sweep, "run_sweep", lambda *args, **kwargs: rows)
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed \(base seed 1\).*--allow-failed"):
        sweep.main(["--workdir", str(tmp_path)])
    sweep.main(["--workdir", str(tmp_path), "--allow-failed"])  # accepted: no exit


def test_grid_values_that_type_to_one_value_are_refused(tmp_path):
    with pytest.raises(ValueError, match="matching_weight=10 and matching_weight=10.0 are the same config"):
        sweep.run_sweep("quick", SETTINGS, {"students.kd_match.objective.matching_weight": ["10", "10.0", "1e1"]}, 1,
                        str(tmp_path))
    assert not os.path.exists(tmp_path / "sweep.json")


def test_two_sweeps_on_one_directory_are_refused_naming_the_holder(tmp_path, monkeypatch):
    _fake_demo(monkeypatch)
    from attrjax._locking import DirectoryInUseError, exclusive_directory
    with exclusive_directory(tmp_path):
        with pytest.raises(DirectoryInUseError, match=f"in use by pid {os.getpid()} on "):
            sweep.run_sweep("quick", SETTINGS, {}, 1, str(tmp_path), log=lambda _: None)
