"""End to end: the real demo (build, teacher, KD, KD + matching, stochastic matching, evaluation) on a tiny build."""

import json
import os

import numpy as np
import pytest

from experiments import common, demo

TINY = ["data.image_size=32", "data.num_train=64", "data.num_val=16", "data.num_localization=16",
        "data.batch_size=8", "teacher.num_steps=4", "students.kd.num_steps=3", "students.kd_match.num_steps=3",
        "eval.batch_size=8", "eval.figure_images=2", "checkpoint_every=2", "log_every=2",
        "stochastic_drop_rate=0.3"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    config = common.load_config("quick", TINY)
    results = demo.run(config, str(tmp_path))
    assert set(results) == {"teacher", "kd", "kd_match", "kd_match_stochastic"}
    for row in results.values():
        assert 0.0 <= row["sample_map"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
        assert row["num_counted"] == 0 or 0.0 <= row["pointing_accuracy"] <= 1.0
    assert results["kd"]["params"] < results["teacher"]["params"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["kd_match"]["params"] == results["kd_match"]["params"]
    assert "| kd_match |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "[kd_match] step 3/3" in out and "matching_loss" in out

    # A second run finds every model finished: it restores them, trains nothing and reproduces the results.
    again = demo.run(config, str(tmp_path))
    out = capsys.readouterr().out
    for name, steps in (("teacher", 4), ("kd", 3), ("kd_match", 3), ("kd_match_stochastic", 3)):
        assert f"[{name}] resuming from the checkpoint of step {steps}" in out
    assert "] step " not in out
    for name in results:
        np.testing.assert_allclose(again[name]["sample_map"], results[name]["sample_map"])
        np.testing.assert_allclose(again[name]["map_cosine"], results[name]["map_cosine"])


def test_config_overrides_and_errors():
    config = common.load_config("quick", ["teacher.num_steps=7", "data.data_dir=/tmp/somewhere"])
    assert config.teacher.num_steps == 7 and config.data.data_dir == "/tmp/somewhere"
    with pytest.raises(ValueError, match="unknown config key"):
        common.load_config("quick", ["teacher.num_stepz=7"])
    with pytest.raises(ValueError, match="available"):
        common.load_config("nope")
    assert common.load_config("paper").matching_layer == "pool5"


def test_evaluating_an_untrained_workdir_says_what_to_run(tmp_path):
    config = common.load_config("quick", TINY)
    with pytest.raises(FileNotFoundError, match="train it first"):
        common.load_trained("teacher", config.teacher, config, str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
