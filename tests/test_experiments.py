"""End to end: the real demo (build, teacher, KD and both prunings, each naive and matched, evaluation) on a
tiny build."""

import csv
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attrjax.attribution._methods import ATTENTION_METHODS, METHODS, resolve_methods
from attrjax.pruning import count_params_and_flops, iterative_sparsity, prune_filters
from attrjax.quantization import load_deployed
from attrjax.training import CheckpointWriteError, RunConfigMismatchError, make_optimizer, read_events
from experiments import configuration, datasets, demo, distill, models, prune, quantize, runs, train_teacher

TINY = ["data.image_size=32", "data.num_train=64", "data.num_val=16", "data.num_localization=16",
        "data.batch_size=8", "teacher.num_steps=4", "students.kd.num_steps=3", "students.kd_match.num_steps=3",
        "pruning.structured.num_steps=2", "pruning.unstructured.rounds=2", "pruning.unstructured.steps_per_round=2",
        "eval.batch_size=8", "eval.figure_images=2", "eval.methods=gradcam,saliency",
        "quantization.num_steps=2", "quantization.calibration_images=8", "eval.faithfulness_steps=2",
        "checkpoint_every=2", "log_every=2"]


RUNS = ["kd_match", "structured", "unstructured_match", "qat_match"]  # PTQ ("quantized"): the ResNet grid test


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    # The default line-up is every setting naive and matched; a naive run takes its matched twin's path without the
    # matching term. Here one run of each setting trains, naive or matched (naive and matched KD: the sweep test,
    # matched structured pruning: the VOC and ResNet tests, post-training quantization: the ResNet test).
    default = configuration.load_config("quick", TINY)
    assert [*distill.student_runs(default), *prune.pruning_runs(default), *quantize.quantization_runs(default)] == [
        "kd", "kd_match", "structured", "structured_match", "unstructured", "unstructured_match", "quantized", "qat",
        "qat_match"]
    config = configuration.load_config("quick", TINY + [f"runs={','.join(RUNS)}"])
    results = demo.run(config, str(tmp_path))
    assert list(results) == ["teacher", *RUNS]
    for row in results.values():
        assert 0.0 <= row["sample_map"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
        assert list(row["methods"]) == ["gradcam", "saliency"]
        for summary in row["methods"].values():
            assert summary["num_counted"] == 0 or 0.0 <= summary["pointing_accuracy"] <= 1.0
            assert 0.0 <= summary["deletion_auc"] <= 1.0 and 0.0 <= summary["insertion_auc"] <= 1.0
    assert results["kd_match"]["params"] < results["teacher"]["params"]
    teacher = runs.load_teacher(config, str(tmp_path))
    pruned_model, pruned_variables = prune_filters(*teacher, config.pruning.structured.rates)
    images = np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32)
    assert results["structured"]["params"] == count_params_and_flops(pruned_model, pruned_variables, images)["params"]
    assert results["structured"]["mflops"] < results["teacher"]["mflops"]
    sparsity = iterative_sparsity(config.pruning.unstructured.rate, 2)
    np.testing.assert_allclose(results["unstructured_match"]["conv_sparsity"], sparsity, atol=1e-3)
    assert results["unstructured_match"]["mflops"] < 0.5 * results["teacher"]["mflops"]
    # int8: a quarter of the float weights' bytes plus scales; the deployed integer network is on disk and loads.
    assert results["qat_match"]["params"] == results["teacher"]["params"]
    assert results["qat_match"]["kbytes"] < 0.35 * results["teacher"]["kbytes"]
    assert results["unstructured_match"]["kbytes"] < 0.5 * results["teacher"]["kbytes"]
    quantized = quantize.calibrated(config, datasets.load_splits(config, str(tmp_path))["train"], *teacher)
    deployed = load_deployed(str(tmp_path / "qat_match" / "deployed.npz"), quantized)
    np.testing.assert_allclose(deployed.nbytes / 1e3, results["qat_match"]["kbytes"])
    # Curves: the rounds of unstructured pruning are one curve; evaluation lands at the run's last step.
    curves = read_events(str(tmp_path / "unstructured_match" / "metrics"))
    assert [step for step, _ in curves["train/loss"]] == [2, 4] and "train/learning_rate" in curves
    np.testing.assert_allclose(dict(curves["eval/sample_map"])[4], results["unstructured_match"]["sample_map"],
                               rtol=1e-6)
    np.testing.assert_allclose(dict(curves["eval/saliency/pointing_accuracy"])[4],
                               results["unstructured_match"]["methods"]["saliency"]["pointing_accuracy"], rtol=1e-6)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["kd_match"]["params"] == results["kd_match"]["params"]
    report = (tmp_path / "results.md").read_text()
    assert "| kd_match |" in report and "| kd_match | saliency |" in report and "deletion AUC" in report
    assert "tensorboard --logdir" in report
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results) * 2 and {row["method"] for row in rows} == {"gradcam", "saliency"}
    assert all(0.0 <= float(row["insertion_auc"]) <= 1.0 for row in rows)
    teacher_rows = [row for row in rows if row["model"] == "teacher"]
    assert all(float(row["map_cosine"]) == 1.0 for row in teacher_rows)
    out = capsys.readouterr().out
    assert "[kd_match] step 3/3" in out and "matching_loss" in out
    assert "evaluated teacher / gradcam" in out and "(1/10, about " in out and "evaluated qat_match / saliency" in out
    assert [int(done) for done in re.findall(r"s \((\d+)/10[,)]", out)] == list(range(1, 11))

    # A second run finds every model finished: it restores them, trains nothing and reproduces the results
    # (evaluated with Grad-CAM alone: evaluation settings are not part of a run).
    again = demo.run(configuration.load_config("quick", TINY + ["eval.methods=gradcam", "eval.faithfulness_steps=0",
                                                                "runs=" + ",".join(RUNS)]),
                     str(tmp_path))
    out = capsys.readouterr().out
    for name, steps in (("teacher", 4), ("kd_match", 3), ("structured", 2), ("unstructured_match/round01", 2),
                        ("unstructured_match/round02", 2), ("qat_match", 2)):
        assert f"[{name}] resuming from the checkpoint of step {steps}" in out
    assert "] step " not in out
    assert list(again) == list(results)
    for name in again:
        np.testing.assert_allclose(again[name]["sample_map"], results[name]["sample_map"])
        np.testing.assert_allclose(again[name]["methods"]["gradcam"]["map_cosine"],
                                   results[name]["methods"]["gradcam"]["map_cosine"])

    # An unstructured run missing its last round is never evaluated from an earlier round.
    shutil.rmtree(tmp_path / "unstructured_match" / "round02")
    with pytest.raises(FileNotFoundError, match="train it first"):
        prune.load("unstructured_match", prune.pruning_runs(config)["unstructured_match"], config, str(tmp_path),
                   *teacher)


def test_stochastic_matching_adds_a_run_to_every_setting_and_runs_chooses_runs():
    config = configuration.load_config("quick", ["stochastic_drop_rate=0.3"])
    students, pruned = distill.student_runs(config), prune.pruning_runs(config)
    assert list(students) == ["kd", "kd_match", "kd_match_stochastic"]
    assert students["kd_match_stochastic"].objective.drop_rate == 0.3
    assert [name for name in pruned if name.endswith("_stochastic")] == ["structured_match_stochastic",
                                                                         "unstructured_match_stochastic"]
    assert pruned["structured_match_stochastic"].objective.to_dict() == dict(
        matching="weighted", matching_weight=config.pruning.matching_weight, drop_rate=0.3)
    quantized = quantize.quantization_runs(config)
    assert list(quantized) == ["quantized", "qat", "qat_match", "qat_match_stochastic"]
    assert quantized["qat_match_stochastic"].objective.drop_rate == 0.3 and not quantized["quantized"].trained
    chosen = configuration.load_config("quick", ["stochastic_drop_rate=0.3", "runs=kd, unstructured_match_stochastic"])
    assert list(distill.student_runs(chosen)) == ["kd"]
    assert list(prune.pruning_runs(chosen)) == ["unstructured_match_stochastic"]
    assert len(prune.pruning_runs(chosen, chosen=False)) == 6


def test_config_overrides_and_errors():
    config = configuration.load_config("quick", ["teacher.num_steps=7", "data.data_dir=/tmp/somewhere"])
    assert config.teacher.num_steps == 7 and config.data.data_dir == "/tmp/somewhere"
    with pytest.raises(ValueError, match="unknown config key"):
        configuration.load_config("quick", ["teacher.num_stepz=7"])
    with pytest.raises(ValueError, match="available"):
        configuration.load_config("nope")
    assert configuration.load_config("paper").matching_layer == "pool5"
    # Typed by the field: a list, a tuple and a float from text, as on the command line.
    config = configuration.load_config("quick", ["pruning.structured.rates=[0.7, 0.5]",
                                                 "students.kd_match.objective.matching_weight=3"])
    assert config.pruning.structured.rates == [0.7, 0.5]
    assert config.students.kd_match.objective.matching_weight == 3.0
    resnet = configuration.load_config("quick_resnet", ["teacher.stage_sizes=(1,2,1,1)"])
    assert resnet.teacher.stage_sizes == (1, 2, 1, 1)
    with pytest.raises(ValueError, match="is not a list literal"):
        configuration.load_config("quick", ["pruning.structured.rates=0.7"])
    assert configuration.load_config("quick:resnet").to_dict() == configuration.load_config("quick_resnet").to_dict()
    long = configuration.load_config("quick:long")  # the schedules the README's evidence ran with
    assert (long.teacher.num_steps, long.students.kd_match.num_steps, long.pruning.structured.num_steps,
            long.pruning.unstructured.steps_per_round, long.quantization.num_steps) == (1200, 900, 150, 50, 100)
    with pytest.raises(ValueError, match="the quick preset has the variants vgg, long and resnet, not 'resnet18'"):
        configuration.load_config("quick:resnet18")
    with pytest.raises(ValueError, match="takes 0 positional arguments"):
        configuration.load_config("pet:resnet")
    path = configuration.config_file("quick")
    assert configuration.load_config(path).to_dict() == configuration.load_config("quick").to_dict()


def test_the_command_line_takes_config_flags_and_warns_on_set(capsys):
    parser = configuration.arg_parser("test")
    args, overrides = configuration.parse_with_overrides(parser, [
        "--config", "paper", "--config.teacher.num_steps=5", "--workdir", "x", "--config.eval.methods", "gradcam,lrp"])
    assert (args.config, args.workdir) == ("paper", "x")
    assert overrides == ["teacher.num_steps=5", "eval.methods=gradcam,lrp"]
    assert capsys.readouterr().err == ""
    _, overrides = configuration.parse_with_overrides(parser, ["--config.seed=1", "--set", "runs=kd"])
    assert overrides == ["seed=1", "runs=kd"] and "--set is deprecated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        configuration.parse_with_overrides(parser, ["--seed=1"])
    assert "unrecognized argument '--seed=1'" in capsys.readouterr().err


def test_the_compute_dtype_is_recorded_when_it_is_not_float32():
    float32, bfloat16, auto = (configuration.load_config("quick", TINY + [f"compute_dtype={name}"])
                               for name in ("float32", "bfloat16", "auto"))
    assert models.compute_dtype_name(auto) == "float32"  # on a CPU
    records = [runs.run_config("teacher", {}, config, "unused", with_teacher=False) for config in (float32, bfloat16)]
    assert "compute_dtype" not in records[0] and records[1]["compute_dtype"] == "bfloat16"
    assert models.build_model(bfloat16.teacher, bfloat16).dtype == jnp.bfloat16


def test_evaluating_an_untrained_workdir_says_what_to_run(tmp_path):
    config = configuration.load_config("quick", TINY)
    with pytest.raises(FileNotFoundError, match="train it first"):
        runs.load_teacher(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
    assert not os.path.exists(tmp_path / "teacher")  # looking did not create the run's directory


@pytest.mark.parametrize("override,expected", [("all", tuple(m for m in METHODS if m not in ATTENTION_METHODS)),
                                               ("paper", ("gradcam", "lrp", "rap", "ebp")),
                                               ("gradcam, lrp", ("gradcam", "lrp"))])
def test_eval_methods_override_from_the_command_line(override, expected):
    config = configuration.load_config("quick", [f"eval.methods={override}"])
    assert resolve_methods(config.eval.methods) == expected


def test_an_unknown_eval_method_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown attribution method 'gradcm'.*available: gradcam"):
        resolve_methods("gradcm,lrp")


@pytest.mark.parametrize("override,message", [
    ("students.kd_match.objective.temperature=0.0", "'kd_match' run: the KD temperature must be a finite number > 0"),
    ("students.kd.objective.kd_alpha=1.5", r"kd_alpha .* must lie in \[0, 1\]"),
    ("pruning.unstructured.rounds=0", "pruning.unstructured.rounds must be an integer >= 1, got 0"),
    ("pruning.structured.rates=[0.7]", "got 1 pruning rates for the 7 convs"),
    ("pruning.structured.num_steps=0", "pruning.structured.num_steps must be an integer >= 1"),
    ("teacher.num_steps=0", "'teacher' run: num_steps must be an integer >= 1"),
    ("log_every=0", "log_every must be an integer >= 1, got 0"),
    ("quantization.bits=3", "quantization settings: quantization bits must be one of \\[4, 8\\], got 3"),
    ("quantization.calibration_images=0", "quantization.calibration_images must be an integer >= 1"),
    ("eval.localization_images=-1", "eval.localization_images must be an integer >= 0"),
    ("eval.methods=gradcm", "unknown attribution method 'gradcm'"),
    ("on_config_change=resume", "on_config_change must be one of"),
    ("data.labels=binary", "data.labels must be 'multilabel' or 'single'"),
    ("compute_dtype=float16", "compute_dtype must be 'auto' or one of float32, bfloat16"),
    ("compute_dtype=bfloat16", "quantization runs compute in float32"),
])
def test_every_run_of_the_demo_is_validated_before_the_first_step(tmp_path, override, message):
    config = configuration.load_config("quick", TINY + [override])
    with pytest.raises(ValueError, match=message):
        demo.run(config, str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing was built or trained


def test_optimizer_label_and_override_errors_name_what_is_wrong(tmp_path):
    sgd_without_momentum = {"name": "sgd", "learning_rate": 0.1, "weight_decay": 0.0, "schedule": "constant"}
    with pytest.raises(ValueError, match="sgd optimizer config lacks momentum"):
        make_optimizer(ml_collections.ConfigDict(sgd_without_momentum), 10)
    with pytest.raises(ValueError, match="teacher has no 'nope'; it has: arch, dropout_rate"):
        configuration.load_config("quick", ["teacher.nope.x=1"])
    with pytest.raises(ValueError, match="config key 'seed' is of type int: .*invalid literal for int"):
        configuration.load_config("quick", ["seed=abc"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        configuration.load_config("quick", ["seed"])
    with pytest.raises(ValueError, match="exactly one class per image.*--config.data.labels=multilabel"):
        datasets.load_splits(configuration.load_config("quick", TINY + ["data.labels=single"]), str(tmp_path))


def test_a_rerun_with_other_settings_is_refused_until_asked_to_restart(tmp_path, capsys):
    config = configuration.load_config("quick", TINY)
    train_teacher.run(config, str(tmp_path))
    reseeded = configuration.load_config("quick", TINY + ["seed=1"])
    with pytest.raises(RunConfigMismatchError, match=r"teacher/checkpoints was written with other settings "
                                                     r"\(1 differ\):\n  config.seed: 0 -> 1\n"):
        train_teacher.run(reseeded, str(tmp_path))
    with pytest.raises(RunConfigMismatchError, match="num_steps: 4 -> 5"):
        runs.load_teacher(configuration.load_config("quick", TINY + ["teacher.num_steps=5"]), str(tmp_path))
    restarted = configuration.load_config("quick", TINY + ["seed=1", "on_config_change=restart"])
    train_teacher.run(restarted, str(tmp_path))
    assert "moved to" in capsys.readouterr().out
    assert [name for name in os.listdir(tmp_path / "teacher") if name.startswith("checkpoints.replaced-")]
    runs.load_teacher(reseeded, str(tmp_path))  # the directory now holds the seed-1 teacher


@pytest.mark.slow
def test_the_resnet_grid_runs_with_one_switch(tmp_path):
    # Unstructured pruning is architecture-agnostic (masks on any tree) and runs end to end in the VGG demo test, as
    # do the naive runs; a ResNet student trains with KD + matching in tests/test_any_model.py.
    config = configuration.load_config("quick_resnet", TINY + ["eval.methods=gradcam", "eval.faithfulness_steps=0",
                                                               "runs=structured_match,quantized"])
    results = demo.run(config, str(tmp_path))
    assert list(results) == ["teacher", "structured_match", "quantized"]
    assert results["quantized"]["kbytes"] < 0.35 * results["teacher"]["kbytes"]
    assert results["quantized"]["params"] == results["teacher"]["params"]  # calibrated, not trained: no steps
    assert dict(read_events(str(tmp_path / "quantized" / "metrics"))["eval/kbytes"]) == {
        0: pytest.approx(results["quantized"]["kbytes"])}
    # Coupled structured pruning at 0.5 halves every width: as many parameters as the half-width student.
    student = models.build_model(config.students.kd_match, config)
    student_params = count_params_and_flops(student, models.init_model(student, jax.random.key(0), config),
                                            models.example_images(config))["params"]
    assert results["structured_match"]["params"] == student_params < results["teacher"]["params"] / 3
    for row in results.values():
        assert 0.0 <= row["sample_map"] <= 1.0 and -1.0 <= row["methods"]["gradcam"]["map_cosine"] <= 1.0


def test_a_write_failure_ends_an_experiment_with_one_line_and_its_traceback_in_the_log(tmp_path, monkeypatch):
    def run(config, workdir):
        raise CheckpointWriteError(f"could not write checkpoint 40 into {workdir}/teacher/checkpoints "
                                   "(PermissionError: Operation not permitted); the newest intact checkpoint, step 20, "
                                   "is untouched")

    monkeypatch.setattr(demo, "run", run)
    monkeypatch.setattr("sys.argv", ["demo", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        demo.main()
    message = str(exit_info.value.code)
    assert message.startswith("error: could not write checkpoint 40") and "\n" not in message
    (log,) = (tmp_path / "logs").iterdir()
    assert message.endswith(f"(traceback in {log})") and "Traceback" in log.read_text()
