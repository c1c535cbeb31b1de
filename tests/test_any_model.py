"""The same training behaviour for a linen ResNet and a user's NNX CNN as for attrjax's VGG (tests/test_train.py):
distillation with attribution matching compiles once, resumes bit-exactly after an interruption, and gives the same
result on 4 devices as on 1."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attrjax.models import NNXSplitModel, resnet_small
from attrjax.training import Objective, sgd, train
from attrjax.training import RunOptions
from tests.test_split_models import UserNNX

IMAGE_SIZE, NUM_CLASSES = 8, 3
KINDS = ("resnet", "nnx")


def pair(kind: str):
    """``(teacher, teacher_variables, student, student_variables, matching_layer)`` of one model family."""
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    if kind == "resnet":
        teacher, student = (resnet_small(NUM_CLASSES, stage_sizes=(1, 1), width_divisor=divisor) for divisor in (2, 4))
        init = [jax.jit(model.init)(jax.random.key(seed), images) for seed, model in enumerate((teacher, student))]
        return teacher, init[0], student, init[1], "layer2_0"
    teacher, student = (NNXSplitModel.from_module(UserNNX(width, nnx.Rngs(seed)), images)
                        for seed, width in enumerate((8, 4)))
    return teacher, teacher.initial_variables, student, student.initial_variables, "blocks.1"


def batches(start_step):
    step = start_step
    while True:
        rng = np.random.default_rng([3, step])
        yield {"image": rng.normal(size=(4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
               "labels": np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, 4)]}
        step += 1


def objective(layer: str) -> Objective:
    return Objective(kd="binary", matching="weighted", matching_weight=10.0, matching_layer=layer, drop_rate=0.25)


@pytest.mark.parametrize("kind", KINDS)
def test_an_interrupted_run_of_any_model_resumes_bit_exactly(tmp_path, kind):
    teacher, teacher_variables, student, student_variables, layer = pair(kind)

    def run(directory, batches_from=batches):
        return train(student, student_variables, sgd(0.05), objective(layer), batches_from, 6, rng=jax.random.key(5),
                     teacher=teacher, teacher_variables=teacher_variables,
                     run=RunOptions(checkpoint_dir=str(directory), checkpoint_every=2, log=lambda _: None))[0]

    def interrupted_at_step_4(start_step):
        for step, batch in enumerate(batches(start_step), start_step + 1):
            if step == 4:
                raise KeyboardInterrupt
            yield batch

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupted_at_step_4)
    resumed = run(tmp_path / "b")
    assert int(resumed.step) == 6
    chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(uninterrupted.params))
    chex.assert_trees_all_equal(jax.device_get(resumed.batch_stats), jax.device_get(uninterrupted.batch_stats))
    assert not np.allclose(jax.tree.leaves(jax.device_get(resumed.params))[0],
                           jax.tree.leaves(jax.device_get(student_variables["params"]))[0])  # it did train


def test_any_model_on_four_devices_equals_one_device():
    """Runs in a subprocess: the virtual device count must be set before JAX starts."""
    script = textwrap.dedent("""
        import chex, jax, numpy as np
        from attrjax.training import TrainState, data_mesh, jit_train_step, make_train_step, replicate, sgd, shard_batch
        from tests.test_any_model import batches, objective, pair
        assert jax.device_count() == 4, jax.devices()
        for kind in ("nnx",):  # VGG and ResNet-like linen models: tests/test_multihost.py
            teacher, teacher_variables, student, student_variables, layer = pair(kind)
            results = []
            for devices in (jax.devices()[:1], jax.devices()):
                chex.clear_trace_counter()  # one compilation per mesh
                mesh, tx = data_mesh(devices), sgd(0.05)
                step = jit_train_step(chex.assert_max_traces(make_train_step(student, tx, objective(layer), teacher),
                                                             n=1), mesh)
                state = replicate(TrainState.create(student_variables, tx), mesh)
                for _, batch in zip(range(3), batches(0)):
                    state, metrics = step(state, replicate(teacher_variables, mesh), shard_batch(batch, mesh),
                                          jax.random.key(2))
                results.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                                float(metrics["loss"])))
            # The donating step freed only replicate's copies, never the caller's variables.
            assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((student_variables, teacher_variables)))
            chex.assert_trees_all_close(results[0][:2], results[1][:2], atol=2e-5, rtol=2e-5)
            np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5)
            print(kind, "OK")
        # Evaluation splits each batch over the process's devices (all four by default): the same numbers as on one.
        from attrjax._evaluation import AttributionEvaluator, ClassificationEvaluator
        from tests.summaries import assert_summaries_close
        batch = {**next(batches(0)), "valid": np.array([True, True, True, False])}
        batch["mask"] = (np.arange(4 * 8 * 8).reshape(4, 8, 8) % 4).astype(np.uint8)
        reports = []
        for devices in (jax.devices()[:1], None):
            attribution = AttributionEvaluator(student, layer=layer, prediction_rule="top1", devices=devices,
                                               faithfulness_steps=2)
            summary, kept = attribution.evaluate(student_variables, [batch], keep_maps=2,
                                                 reference=(teacher, teacher_variables))
            classification = dict(ClassificationEvaluator(student, devices=devices).run(student_variables, [batch]))
            reports.append((summary, kept["maps"], classification))
        assert len(attribution.placement.mesh.devices) == 4
        (one, one_maps, one_classification), (four, four_maps, four_classification) = reports
        chex.assert_trees_all_close(one_maps, four_maps, atol=1e-6)
        chex.assert_trees_all_close(one_classification, four_classification, rtol=1e-6)
        assert_summaries_close(four, one, rtol=1e-5, auc_rtol=1e-3)
        print("evaluation OK")
    """)
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the suite's compilation cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["nnx", "OK", "evaluation", "OK"]
