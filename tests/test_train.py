"""The train step and loop: one compile, exact resume, bfloat16 compute, clear errors (several devices and
processes: tests/test_multihost.py)."""

import csv
import os
import shutil
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attrjax.models import init_variables, vgg
from attrjax.training import (CheckpointWriteError, MetricWriter, Objective, TrainState, data_mesh, jit_train_step,
                           learning_rate_schedule, make_loss_fn, make_train_step, read_events, replicate, sgd,
                           shard_batch, train)
from attrjax.training import RunOptions

KWARGS = dict(num_classes=4, image_size=16, attribution_layer="pool2")


def _models(dtype=jnp.float32):
    return vgg(((8,), (8,)), dtype=dtype, **KWARGS), vgg(((2,), (4,)), dtype=dtype, **KWARGS)


def _batches(batch_size=8, seed=0):
    """A pure function of the step, as the trainer requires."""

    def batches(start_step):
        step = start_step
        while True:
            rng = np.random.default_rng([seed, step])
            yield {"image": rng.normal(size=(batch_size, 16, 16, 3)).astype(np.float32),
                   "labels": (rng.random((batch_size, 4)) > 0.5).astype(np.float32)}
            step += 1

    return batches


MATCHED = Objective(kd="binary", matching="weighted", matching_weight=100.0, matching_layer="pool2", drop_rate=0.25)


def test_step_compiles_once_and_learns():
    teacher, student = _models()
    tx = sgd(0.05)
    mesh = data_mesh()
    step = jit_train_step(chex.assert_max_traces(make_train_step(student, tx, MATCHED, teacher), n=1), mesh)
    state = replicate(TrainState.create(init_variables(student, jax.random.key(1)), tx), mesh)
    teacher_vars = replicate(init_variables(teacher, jax.random.key(0)), mesh)
    batch = shard_batch(next(_batches()(0)), mesh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, teacher_vars, batch, jax.random.key(2))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < losses[0]


@pytest.mark.oldest
def test_resumed_run_ends_with_the_same_parameters(tmp_path):
    teacher, student = _models()
    teacher_vars = init_variables(teacher, jax.random.key(0))
    def run(directory, batches=_batches()):
        return train(student, init_variables(student, jax.random.key(1)), sgd(0.05), MATCHED, batches, 7,
                     rng=jax.random.key(5), teacher=teacher, teacher_variables=teacher_vars,
                     run=RunOptions(checkpoint_dir=str(directory), checkpoint_every=3, log=lambda _: None))[0]

    def interrupted_at_step_5(start_step):
        for step, batch in enumerate(_batches()(start_step), start_step + 1):
            if step == 5:
                raise KeyboardInterrupt
            yield batch

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupted_at_step_5)  # the newest checkpoint is step 3
    resumed = run(tmp_path / "b")
    assert int(resumed.step) == 7
    chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(uninterrupted.params))
    chex.assert_trees_all_equal(jax.device_get(resumed.batch_stats), jax.device_get(uninterrupted.batch_stats))


def test_restoring_into_another_architecture_fails_clearly(tmp_path):
    teacher, student = _models()
    train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(), 2,
          rng=jax.random.key(0), run=RunOptions(checkpoint_dir=str(tmp_path), checkpoint_every=1, log=lambda _: None))
    with pytest.raises(ValueError, match=r"param_shapes\.conv1_1/kernel: \[3, 3, 3, 2\] -> \[3, 3, 3, 8\]"):
        train(teacher, init_variables(teacher, jax.random.key(1)), sgd(0.05), Objective(), _batches(), 2,
              rng=jax.random.key(0),
              run=RunOptions(checkpoint_dir=str(tmp_path), checkpoint_every=1, log=lambda _: None))


def test_non_finite_inputs_are_rejected():
    _, student = _models()

    def poisoned(start_step):
        batch = next(_batches()(start_step))
        batch["image"][0, 0, 0, 0] = np.nan
        yield batch

    with pytest.raises(ValueError, match="non-finite"):
        train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), poisoned, 1,
              rng=jax.random.key(0), run=RunOptions(log=lambda _: None))


def test_bad_objectives_are_rejected():
    teacher, student = _models()
    with pytest.raises(ValueError, match="need a teacher"):
        make_train_step(student, sgd(0.1), Objective(kd="binary"))
    with pytest.raises(ValueError, match="matching='weighted'"):
        Objective(matching="activation", drop_rate=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Objective(matching="weighted", drop_rate=1.0)
    with pytest.raises(ValueError, match="classes"):
        make_train_step(vgg(((2,), (4,)), num_classes=5, image_size=16), sgd(0.1), Objective(kd="binary"), teacher)



def test_a_bfloat16_pair_hands_back_float32_losses_gradients_and_state():
    teacher_variables = init_variables(_models()[0], jax.random.key(0))
    variables = init_variables(_models()[1], jax.random.key(1))
    batch = next(_batches()(0))
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        teacher, student = _models(dtype)
        loss_fn = make_loss_fn(student, MATCHED, teacher)
        (loss, (state, metrics)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            variables["params"], variables["batch_stats"], teacher_variables, batch, jax.random.key(2))
        assert {leaf.dtype for leaf in jax.tree.leaves((loss, metrics["matching_loss"], grads, state))} == {
            jnp.dtype(jnp.float32)}  # the network computed in bfloat16; nothing it hands back is
        results[dtype] = loss, metrics
    (loss32, metrics32), (loss16, metrics16) = results.values()
    assert loss16 != loss32  # it did compute in bfloat16
    np.testing.assert_allclose(metrics16["task_loss"], metrics32["task_loss"], rtol=1e-2)
    # The matching loss of random networks is not: their Grad-CAM maps are sums of gradients of random sign, whose
    # cancellation bfloat16 rounds (~10% here). benchmarks/mixed_precision.py measures trained ones.


def test_objective_without_matching_trains_the_teacher_task():
    _, student = _models()
    state, history = train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(),
                           4, rng=jax.random.key(0), run=RunOptions(log_every=2, log=lambda _: None))
    assert [h["step"] for h in history] == [2, 4]
    assert all("matching_loss" not in h for h in history)
    assert jnp.isfinite(history[-1]["loss"])


def test_kd_without_matching_works_for_layouts_without_the_default_layer():
    """Objective's default matching_layer (pool5) does not exist in a 2-stage VGG; plain KD must not need it."""
    teacher, student = _models()
    state, history = train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(kd="binary"),
                           _batches(), 2, rng=jax.random.key(0), teacher=teacher,
                           teacher_variables=init_variables(teacher, jax.random.key(0)),
                           run=RunOptions(log=lambda _: None))
    assert int(state.step) == 2 and jnp.isfinite(history[-1]["loss"])


def test_a_student_built_from_the_teachers_own_device_arrays_trains_and_leaves_them_intact():
    teacher, _ = _models()
    teacher_variables = jax.device_put(init_variables(teacher, jax.random.key(0)))  # as pruning starts its students
    before = jax.device_get(teacher_variables)
    objective = Objective(matching="weighted", matching_weight=1.0, matching_layer="pool2")
    state, _ = train(teacher, teacher_variables, sgd(0.05), objective, _batches(), 3, rng=jax.random.key(1),
                     teacher=teacher, teacher_variables=teacher_variables, run=RunOptions(log=lambda _: None))
    assert int(state.step) == 3
    chex.assert_trees_all_equal(jax.device_get(teacher_variables), before)  # still readable and unchanged


def test_a_metrics_csv_left_empty_by_a_killed_run_gets_its_header_when_the_run_resumes(tmp_path):
    (tmp_path / "metrics.csv").write_text("")  # created, then killed before the first flush
    with MetricWriter(str(tmp_path)) as writer:
        writer.write(5, {"train/loss": 0.5})
    with open(tmp_path / "metrics.csv") as f:
        assert list(csv.DictReader(f)) == [{"step": "5", "name": "train/loss", "value": "0.5"}]
    with MetricWriter(str(tmp_path)) as writer:  # a file with rows is appended to, without a second header
        writer.write(6, {"train/loss": 0.25})
    with open(tmp_path / "metrics.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["5", "6"]


def test_logged_lines_are_tensorboard_events_and_a_csv_that_read_back(tmp_path):
    _, student = _models()
    schedule = learning_rate_schedule(0.05, 6, kind="cosine", warmup_steps=2)
    directory = str(tmp_path / "metrics")
    with MetricWriter(directory, step_offset=10) as writer:
        _, history = train(student, init_variables(student, jax.random.key(1)), optax.sgd(schedule), Objective(),
                           _batches(), 6, rng=jax.random.key(0),
                           run=RunOptions(log_every=3, log=lambda _: None, metric_writer=writer,
                                          learning_rate=schedule))
    events = read_events(directory)
    assert set(events) == {"train/loss", "train/task_loss", "train/images_per_s", "train/learning_rate"}
    for name in ("loss", "learning_rate"):
        assert [step for step, _ in events[f"train/{name}"]] == [13, 16]
        np.testing.assert_allclose([value for _, value in events[f"train/{name}"]], [h[name] for h in history],
                                   rtol=1e-6)
    np.testing.assert_allclose(history[0]["learning_rate"], schedule(2))  # the rate step 3 applied
    with open(os.path.join(directory, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 and {row["name"] for row in rows} == set(events)
    assert [float(row["value"]) for row in rows if row["name"] == "train/loss"] == [h["loss"] for h in history]
    # A damaged event file is an error, never silently partial data.
    (path,) = [os.path.join(directory, name) for name in os.listdir(directory) if name.startswith("events")]
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch"):
        read_events(directory)


def test_a_run_resumed_from_an_earlier_checkpoint_logs_each_step_once(tmp_path):
    _, student = _models()
    checkpoints, curves = str(tmp_path / "checkpoints"), str(tmp_path / "metrics")

    def run():
        with MetricWriter(curves) as writer:
            return train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), _batches(), 4,
                         rng=jax.random.key(0),
                         run=RunOptions(checkpoint_dir=checkpoints, checkpoint_every=2, log_every=1, log=lambda _: None,
                                        metric_writer=writer))[1]

    first = run()
    # Killed after logging steps 3 and 4 but before their checkpoint landed: the rerun resumes from step 2.
    shutil.rmtree(os.path.join(checkpoints, "4"))
    replayed = run()
    assert [record["step"] for record in replayed] == [3, 4]
    with open(os.path.join(curves, "metrics.csv")) as f:
        rows = [(int(row["step"]), row["name"]) for row in csv.DictReader(f)]
    assert sorted(rows) == sorted(set(rows)) and {step for step, _ in rows} == {1, 2, 3, 4}
    events = read_events(curves)  # two event files; the second's purge marker hides the first's steps 3 and 4
    assert [step for step, _ in events["train/loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([value for _, value in events["train/loss"]],
                               [record["loss"] for record in first[:2] + replayed], rtol=1e-6)
    assert len([name for name in os.listdir(curves) if name.startswith("events")]) == 2


def test_integer_images_and_class_index_labels_are_refused_and_single_labels_still_train():
    _, student = _models()
    variables = init_variables(student, jax.random.key(1))

    def run(objective, **changes):
        def batches(start_step):
            yield {**next(_batches(batch_size=4)(start_step)), **changes}
        return train(student, variables, sgd(0.05), objective, batches, 1, rng=jax.random.key(0),
                     teacher=student, teacher_variables=variables, run=RunOptions(log=lambda _: None))

    with pytest.raises(ValueError, match=r"batch of step 1: images must be floating point \(normalised floats\), got "
                                         r"uint8; convert them, e.g. images.astype\(np.float32\) / 255"):
        run(Objective(), image=np.zeros((4, 16, 16, 3), np.uint8))
    indices = np.array([0, 1, 2, 3])  # B == K: (B,) would broadcast against the (B,K) logits
    with pytest.raises(ValueError, match=r"multilabel labels must be \(B, K\) multi-hot for logits \(4, 4\) \(B, K\), "
                                         r"got labels of shape \(4,\) .*look like class indices: one-hot them"):
        run(Objective(), labels=indices)
    with pytest.raises(ValueError, match=r"got labels of shape \(4,\)"):
        run(Objective(kd="binary"), labels=indices)  # binary KD mixes in the multi-label loss
    batch = {**next(_batches(batch_size=4)(0)), "labels": indices}  # single-label objectives take class indices
    loss, _ = jax.eval_shape(make_loss_fn(student, Objective(labels="single")), variables["params"],
                             variables["batch_stats"], {}, batch, jax.random.key(2))
    chex.assert_shape(loss, ())


def _immutable(directory, on: bool) -> bool:
    """``chattr +i`` / ``-i``: a directory nobody may write, root included; False where the file system or the
    process cannot do it."""
    return subprocess.run(["chattr", "+i" if on else "-i", str(directory)], capture_output=True).returncode == 0


def test_a_checkpoint_that_cannot_be_written_stops_the_run_at_once_and_it_resumes_exactly(tmp_path):
    _, student = _models()
    directory = tmp_path / "checkpoints"

    def run(directory, batches=_batches()):
        return train(student, init_variables(student, jax.random.key(1)), sgd(0.05), Objective(), batches, 6,
                     rng=jax.random.key(0),
                     run=RunOptions(checkpoint_dir=str(directory), checkpoint_every=2, log=lambda _: None))[0]

    def directory_made_unwritable_at_step_3(start_step):
        for step, batch in enumerate(_batches()(start_step), start_step + 1):
            if step == 3 and not _immutable(directory, True):
                pytest.skip("chattr +i is not available here")
            yield batch

    started = time.perf_counter()
    try:
        with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint 4 into .*checkpoints \(Perm.*"
                           r"the newest intact checkpoint, step 2, is untouched and a rerun"):
            run(directory, directory_made_unwritable_at_step_3)
    finally:
        _immutable(directory, False)
    assert time.perf_counter() - started < 60  # orbax's background threads used to wait 300 s here
    chex.assert_trees_all_equal(jax.device_get(run(directory).params),
                                jax.device_get(run(tmp_path / "uninterrupted").params))


def test_the_0_1_bookkeeping_keywords_still_train_with_a_warning_that_names_run_options():
    _, student = _models()
    variables = init_variables(student, jax.random.key(1))
    with pytest.warns(DeprecationWarning, match=r"train\(\.\.\., log_every=\.\.\., log=\.\.\.\) is deprecated .* pass "
                                                r"run=attrjax\.training\.RunOptions\(log_every=\.\.\., log=\.\.\.\)"):
        _, old = train(student, variables, sgd(0.05), Objective(), _batches(), 2, rng=jax.random.key(0),
                       log_every=1, log=lambda _: None)
    _, new = train(student, variables, sgd(0.05), Objective(), _batches(), 2, rng=jax.random.key(0),
                   run=RunOptions(log_every=1, log=lambda _: None))
    assert [row["loss"] for row in old] == [row["loss"] for row in new] and len(new) == 2
    with pytest.raises(TypeError, match=r"pass \['log_every'\] inside run=RunOptions\(\.\.\.\), not beside it"):
        train(student, variables, sgd(0.05), Objective(), _batches(), 2, rng=jax.random.key(0), log_every=1,
              run=RunOptions())
    with pytest.raises(TypeError, match=r"run must be an attrjax\.training\.RunOptions, got dict"):
        train(student, variables, sgd(0.05), Objective(), _batches(), 2, rng=jax.random.key(0),
              run={"log_every": 1})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['checkpoint_dri'\]"):
        train(student, variables, sgd(0.05), Objective(), _batches(), 2, rng=jax.random.key(0), checkpoint_dri="x")
