"""Fault injection: runs killed at random points resume bit-exactly, nothing non-finite is ever checkpointed,
damaged checkpoints are detected and skipped, and a directory refuses a run with other settings."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax._files import write_json
from attrjax.models import init_variables, vgg
from attrjax.training import (NonFiniteStateError, Objective, RunConfigMismatchError, TrainState, checkpoint_manager,
                           restore_latest, sgd, train)
from attrjax.training._checkpoint import restore_step, save
from attrjax.training import RunOptions
from tests import fault_child
from tests.test_train import MATCHED, _batches, _models

CHILD = os.path.join(os.path.dirname(__file__), "fault_child.py")


def _child(workdir, num_steps, *fault) -> subprocess.CompletedProcess:
    """One child run, in the suite's compilation cache: every child compiles the same programs."""
    cache = dict(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([sys.executable, CHILD, str(workdir), str(num_steps), *map(str, fault)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, **cache))


def _final(workdir) -> dict:
    with np.load(os.path.join(workdir, "final.npz")) as final:
        return dict(final)


def test_runs_killed_before_a_step_and_in_the_middle_of_a_save_resume_bit_exactly(tmp_path, capsys):
    # Killed runs are child processes; the uninterrupted reference and the run that finishes the killed one's work
    # run here, in a process that never touched their directories.
    fault_child.main(str(tmp_path / "reference"), 7)
    rng = np.random.default_rng(0)
    kill_step, kill_save = int(rng.integers(2, 5)), int(rng.choice([4, 6]))
    workdir = tmp_path / "killed"
    killed = _child(workdir, 7, "step", kill_step)
    assert killed.returncode == -9 and not os.path.exists(workdir / "final.npz")
    killed = _child(workdir, 7, "save", kill_save)
    assert killed.returncode == -9 and "resuming from the checkpoint" in killed.stdout
    assert not os.path.exists(workdir / "checkpoints" / str(kill_save))  # died before the save was committed
    capsys.readouterr()
    fault_child.main(str(workdir), 7)
    assert f"resuming from the checkpoint of step {kill_save - 2}" in capsys.readouterr().out
    chex.assert_trees_all_equal(_final(workdir), _final(tmp_path / "reference"))


def test_a_diverging_run_names_the_step_and_cause_saves_nothing_non_finite_and_is_quiet(tmp_path, capsys):
    diverged = _child(tmp_path, 7, "nan", 5)  # checkpoints every 2 steps: 1, 2, 4 are finite
    assert diverged.returncode == 1
    assert "step 5 went non-finite (state" in diverged.stderr and "learning-rate schedule" in diverged.stderr
    assert "Event loop is closed" not in diverged.stderr and len(diverged.stderr.splitlines()) < 30
    manager = checkpoint_manager(str(tmp_path / "checkpoints"), save_every=2)
    assert manager.latest_step() == 4
    teacher, student = _models()
    template = TrainState.create(init_variables(student, jax.random.key(1)), sgd(lambda count: 0.05))
    restored = restore_latest(manager, template)
    manager.close()
    assert int(restored.step) == 4
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(restored)))
    # A rerun with a sane learning rate resumes from the last finite checkpoint and finishes.
    capsys.readouterr()
    fault_child.main(str(tmp_path), 7)
    assert "resuming from the checkpoint of step 4" in capsys.readouterr().out
    assert all(np.all(np.isfinite(leaf)) for leaf in _final(tmp_path).values())


def _overflowing_at(step_to_poison):
    def batches(start_step):
        for step, batch in enumerate(_batches()(start_step), start_step + 1):
            if step == step_to_poison:
                batch["image"] = batch["image"] * np.float32(1e30)  # finite, but BatchNorm's variance overflows
            yield batch

    return batches


@pytest.mark.parametrize("poisoned_step,cause", [(1, "first step, so a setting is wrong"),
                                                 (3, "logits overflowed")])
def test_overflowing_data_names_the_step_and_the_term(tmp_path, poisoned_step, cause):
    teacher, student = _models()
    with pytest.raises(FloatingPointError, match=f"step {poisoned_step} went non-finite \\(loss, task_loss.*{cause}"):
        train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(),
              _overflowing_at(poisoned_step), 4, rng=jax.random.key(0),
              run=RunOptions(checkpoint_dir=str(tmp_path), checkpoint_every=1, log=lambda _: None))
    manager = checkpoint_manager(str(tmp_path), save_every=1)
    assert (manager.latest_step() or 0) == poisoned_step - 1
    manager.close()


def test_a_broken_teacher_is_blamed_and_a_zero_kd_temperature_is_refused():
    teacher, student = _models()
    teacher_variables = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), init_variables(teacher,
                                                                                               jax.random.key(0)))
    with pytest.raises(FloatingPointError, match="teacher's logits or maps are NaN"):
        train(student, init_variables(student, jax.random.key(1)), sgd(0.05), MATCHED, _batches(), 2,
              rng=jax.random.key(0), teacher=teacher, teacher_variables=teacher_variables,
              run=RunOptions(log=lambda _: None))
    for options in (dict(temperature=0.0), dict(temperature=float("nan")), dict(kd_alpha=1.5)):
        with pytest.raises(ValueError, match="temperature|kd_alpha"):
            Objective(kd="binary", **options)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="log_every must be a positive"):
            train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(), 2,
                  rng=jax.random.key(0), run=RunOptions(log_every=bad))
    with pytest.raises(ValueError, match="num_steps must be a positive"):
        train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(), 0,
              rng=jax.random.key(0))


def test_save_refuses_a_non_finite_state(tmp_path):
    _, student = _models()
    variables = init_variables(student, jax.random.key(1))
    variables["params"]["conv1_1"]["kernel"] = variables["params"]["conv1_1"]["kernel"].at[0, 0, 0, 0].set(jnp.inf)
    manager = checkpoint_manager(str(tmp_path), save_every=1)
    with pytest.raises(NonFiniteStateError, match=r"\['conv1_1'\]\['kernel'\]"):
        save(manager, TrainState.create(variables, sgd(0.1)), force=True)
    manager.close()
    assert manager.all_steps() == []


# Wide enough that its large kernels are stored out of orbax's index (see _flip_four_bytes).
DAMAGED_MODEL = vgg(((8,), (64,)), num_classes=4, image_size=16, attribution_layer="pool2")


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4, and a template of its state."""
    directory = tmp_path_factory.mktemp("pristine")
    student = DAMAGED_MODEL
    train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(), 4,
          rng=jax.random.key(0), run=RunOptions(checkpoint_dir=str(directory), checkpoint_every=2, log=lambda _: None))
    template = TrainState.create(init_variables(student, jax.random.key(1)), sgd(0.05))
    manager = checkpoint_manager(str(directory), save_every=2)
    assert manager.all_steps() == [2, 4]
    manager.close()
    return directory, template


def _data_files(step_dir):
    return sorted((os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
                   for name in names if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep),
                  key=os.path.getsize)


def _flip_four_bytes(step_dir):
    """Flips 4 bytes in the middle of the largest per-process data file, where orbax keeps large arrays with no
    checksum of its own (small values sit in the index, whose CRC tensorstore checks): orbax reads the altered
    values back without an error."""
    path = max((path for path in _data_files(step_dir) if "ocdbt.process_" in path), key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    open(path, "wb").write(bytes(data))


def _truncate(step_dir):
    path = _data_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGES = {"flipped bytes": (_flip_four_bytes, "checksum mismatch"),
           "truncated data file": (_truncate, "cannot be read|checksum mismatch"),
           "deleted data file": (lambda step_dir: os.remove(_data_files(step_dir)[-1]), "cannot be read"),
           "deleted manifest": (lambda step_dir: shutil.rmtree(os.path.join(step_dir, "manifest")), "manifest")}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_set_aside_for_the_newest_intact_one(tmp_path, four_step_run, damage):
    pristine, template = four_step_run
    directory = tmp_path / "checkpoints"
    shutil.copytree(pristine, directory)
    damage_fn, reason = DAMAGES[damage]
    damage_fn(str(directory / "4"))
    manager, messages = checkpoint_manager(str(directory), save_every=2), []
    restored = restore_latest(manager, template, log=messages.append)
    manager.close()
    assert len(messages) == 1 and messages[0].startswith(f"skipping checkpoint {directory}/4: "), messages
    assert any(word in messages[0] for word in reason.split("|")), messages[0]
    assert manager.all_steps() == [2] and os.listdir(f"{directory}.corrupt")[0].startswith("4-")
    pristine_manager = checkpoint_manager(str(pristine), save_every=2)
    step_2 = restore_step(pristine_manager, 2, template)
    pristine_manager.close()
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(step_2))


def test_a_run_resumes_past_a_damaged_checkpoint(tmp_path, four_step_run):
    pristine, _ = four_step_run
    shutil.copytree(pristine, tmp_path / "checkpoints")
    _flip_four_bytes(str(tmp_path / "checkpoints" / "4"))
    student = DAMAGED_MODEL
    lines = []
    state, _ = train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(), 4,
                     rng=jax.random.key(0),
                     run=RunOptions(checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=2, log=lines.append))
    assert any("skipping checkpoint" in line for line in lines)
    assert "[train] resuming from the checkpoint of step 2" in lines
    manager = checkpoint_manager(str(pristine), save_every=2)
    finished = restore_latest(manager, state)
    manager.close()
    chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(finished.params))


def test_a_directory_refuses_other_settings_or_restarts_when_asked(tmp_path):
    _, student = _models()

    def run(num_steps, run_config, on_config_change="refuse"):
        return train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(),
                     num_steps, rng=jax.random.key(0),
                     run=RunOptions(checkpoint_dir=str(tmp_path / "run"), checkpoint_every=2, run_config=run_config,
                                    on_config_change=on_config_change, log=lambda _: None))[0]

    shapes = {"seed": 0, "data": {"name": "shapes"}}
    run(2, shapes)
    for num_steps, run_config, difference in (
            (4, shapes, "num_steps: 2 -> 4"),
            (2, {**shapes, "seed": 1}, "config.seed: 0 -> 1"),
            (2, {**shapes, "data": {"name": "voc2012"}}, 'config.data.name: "shapes" -> "voc2012"'),
            (2, {"seed": 0}, 'config.data.name: "shapes" -> "<absent>"')):
        with pytest.raises(RunConfigMismatchError, match=f"1 differ.*\\n  {difference}\\n.*on_config_change"):
            run(num_steps, run_config)
    state = run(4, {"seed": 1}, on_config_change="restart")
    assert int(state.step) == 4
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert record["config"]["config"] == {"seed": 1} and record["config"]["num_steps"] == 4
    replaced = [name for name in os.listdir(tmp_path) if name.startswith("run.replaced-")]
    assert len(replaced) == 1 and sorted(os.listdir(tmp_path / replaced[0]))[:2] == ["1", "2"]


def test_json_results_are_valid_and_written_atomically(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"nan": float("nan"), "inf": np.float32(np.inf), "array": np.arange(2), "tuple": (1, 2.5)})
    assert json.loads(path.read_text()) == {"nan": None, "inf": None, "array": [0, 1], "tuple": [1, 2.5]}
    with pytest.raises(TypeError, match="cannot write object"):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["tuple"] == [1, 2.5]  # the old file is intact
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind
