"""Unstructured magnitude pruning: thresholds, the iterative schedule, exact zeros under optimisation, checkpoints,
and masks on linen, NNX and plain parameter trees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attrjax.models import init_variables, vgg
from attrjax.pruning import (apply_masks, conv_kernels, iterative_sparsity, keep_pruned_at_zero, magnitude_masks,
                             sparsity_summary)
from attrjax.training import Objective, TrainState, checkpoint_manager, restore_latest, sgd, train
from attrjax.training._checkpoint import save
from attrjax.training import RunOptions

MODEL = vgg(((8,), (8, 16)), num_classes=4, image_size=16, attribution_layer="pool2")


def _params(seed=0):
    return init_variables(MODEL, jax.random.key(seed))["params"]


def _num_conv_weights(params):
    return sparsity_summary(params)["size"]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.97])
def test_global_threshold_reaches_the_target_within_one_weight(sparsity):
    params = _params()
    pruned = sparsity_summary(apply_masks(params, magnitude_masks(params, sparsity)))
    assert abs(pruned["zeros"] - sparsity * pruned["size"]) <= 1
    # Biases, BatchNorm and the dense head are untouched.
    kept = apply_masks(params, magnitude_masks(params, sparsity))
    chex.assert_trees_all_equal(kept["classifier"], params["classifier"])
    chex.assert_trees_all_equal(kept["bn1_1"], params["bn1_1"])
    chex.assert_trees_all_equal(kept["conv2_2"]["bias"], params["conv2_2"]["bias"])


def test_global_threshold_is_one_threshold_for_all_layers():
    params = _params()
    masks = magnitude_masks(params, 0.6)
    kept = np.concatenate([np.abs(params[n]["kernel"])[masks[n]["kernel"]] for n in ("conv1_1", "conv2_1", "conv2_2")])
    dropped = np.concatenate([np.abs(params[n]["kernel"])[~masks[n]["kernel"]]
                              for n in ("conv1_1", "conv2_1", "conv2_2")])
    assert kept.min() > dropped.max()


def test_layer_scope_prunes_each_layer_to_the_target():
    params = _params()
    layers = sparsity_summary(apply_masks(params, magnitude_masks(params, 0.3, scope="layer")))["layers"]
    for row in layers.values():
        assert abs(row["zeros"] - 0.3 * row["size"]) <= 1


def test_iterative_schedule_reaches_the_papers_final_sparsity():
    """16 rounds of p = 0.2 on the global |w| ranking, zeros included, end at 1 - 0.8^16 ~ 0.9719."""
    params = _params()
    for round_index in range(1, 17):
        target = iterative_sparsity(0.2, round_index)
        params = apply_masks(params, magnitude_masks(params, target))
        params = jax.tree.map(lambda x: x * 1.01, params)  # a stand-in for fine-tuning between rounds
        assert abs(sparsity_summary(params)["zeros"] - target * _num_conv_weights(params)) <= 1
    np.testing.assert_allclose(sparsity_summary(params)["sparsity"], 1 - 0.8**16, atol=1 / _num_conv_weights(params))


def test_pruned_weights_stay_exactly_zero_through_momentum_and_weight_decay():
    params = _params()
    masks = magnitude_masks(params, 0.7)
    variables = dict(init_variables(MODEL, jax.random.key(0)), params=apply_masks(params, masks))

    def batches(start_step):
        step = start_step
        while True:
            rng = np.random.default_rng(step)
            yield {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                   "labels": (rng.random((8, 4)) > 0.5).astype(np.float32)}
            step += 1

    tx = keep_pruned_at_zero(sgd(0.1, momentum=0.9, weight_decay=1e-2), masks)
    state, _ = train(MODEL, variables, tx, Objective(), batches, 30, rng=jax.random.key(1),
                     run=RunOptions(log=lambda _: None))
    for name in ("conv1_1", "conv2_1", "conv2_2"):
        kernel, keep = np.asarray(state.params[name]["kernel"]), np.asarray(masks[name]["kernel"])
        assert np.all(kernel[~keep] == 0.0)
        assert np.any(kernel[keep] != np.asarray(params[name]["kernel"])[keep])  # the kept weights did train


def test_masks_survive_a_checkpoint_round_trip(tmp_path):
    params = _params()
    masks = magnitude_masks(params, 0.5)
    tx = keep_pruned_at_zero(optax.sgd(0.1, momentum=0.9), masks)
    state = TrainState.create(dict(init_variables(MODEL, jax.random.key(0)), params=apply_masks(params, masks)), tx)
    manager = checkpoint_manager(str(tmp_path), save_every=1)
    save(manager, state, force=True)
    manager.wait_until_finished()
    # The template needs no masks: without them the wrapper derives them from the (here unpruned) params.
    template = TrainState.create(init_variables(MODEL, jax.random.key(7)),
                                 keep_pruned_at_zero(optax.sgd(0.1, momentum=0.9)))
    restored = restore_latest(manager, template)
    chex.assert_trees_all_equal(jax.device_get(restored.opt_state.masks), jax.device_get(masks))


def test_restoring_masks_into_another_architecture_fails_clearly(tmp_path):
    params = _params()
    masks = magnitude_masks(params, 0.5)
    state = TrainState.create(init_variables(MODEL, jax.random.key(0)), keep_pruned_at_zero(optax.sgd(0.1), masks))
    manager = checkpoint_manager(str(tmp_path), save_every=1)
    save(manager, state, force=True)
    manager.wait_until_finished()
    other = vgg(((4,), (8, 8)), num_classes=4, image_size=16, attribution_layer="pool2")
    other_params = init_variables(other, jax.random.key(0))["params"]
    template = TrainState.create(init_variables(other, jax.random.key(0)),
                                 keep_pruned_at_zero(optax.sgd(0.1), magnitude_masks(other_params, 0.5)))
    with pytest.raises(ValueError, match="does not fit"):
        restore_latest(manager, template)


def test_bad_inputs_are_rejected():
    params = _params()
    for rate in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            magnitude_masks(params, rate)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            iterative_sparsity(rate, 3)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(params, 0.5, scope="network")
    with pytest.raises(ValueError, match="no prunable leaves"):
        magnitude_masks(params, 0.5, prunable=lambda path, leaf: False)
    masks = magnitude_masks(params, 0.5)
    del masks["conv1_1"]
    with pytest.raises(ValueError, match="tree structure"):
        apply_masks(params, masks)
    with pytest.raises(ValueError, match="tree structure"):
        keep_pruned_at_zero(optax.sgd(0.1), masks).init(params)
    wrong_shape = jax.tree.map(lambda m: m, magnitude_masks(params, 0.5))
    wrong_shape["conv1_1"]["kernel"] = jnp.ones((1, 1, 3, 8), bool)
    with pytest.raises(ValueError, match="shape"):
        apply_masks(params, wrong_shape)
    chex.assert_trees_all_equal(apply_masks(params, magnitude_masks(params, 0.0)), params)


def test_the_wrapper_takes_extra_args_and_derives_masks_from_the_zeros_of_the_params():
    params = _params()
    masks = magnitude_masks(params, 0.6)
    pruned = apply_masks(params, masks)

    def scale_by(factor):  # an inner transformation that needs an extra argument
        return optax.GradientTransformationExtraArgs(
            lambda _: optax.EmptyState(), lambda u, state, params=None, *, factor: (
                jax.tree.map(lambda g: g * factor, u), state))

    tx = keep_pruned_at_zero(scale_by(3.0), masks)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(pruned), pruned, factor=3.0)
    chex.assert_trees_all_equal(updates, jax.tree.map(lambda m: jnp.where(m, 3.0, 0.0), masks))
    # A transformation without extra arguments ignores them.
    plain = keep_pruned_at_zero(optax.sgd(1.0), masks)
    chex.assert_trees_all_equal(plain.update(grads, plain.init(pruned), pruned, factor=3.0)[0],
                                jax.tree.map(lambda m: jnp.where(m, -1.0, 0.0), masks))
    # Without masks: a conv weight is kept iff it is non-zero; biases and BatchNorm (zero-initialised) stay trainable.
    derived = keep_pruned_at_zero(optax.sgd(0.1)).init(pruned).masks
    chex.assert_trees_all_equal(derived, masks)
    assert np.all(np.asarray(pruned["bn1_1"]["bias"]) == 0)
    # Only shapes are needed for a template (e.g. of a checkpoint to restore).
    abstract = jax.eval_shape(keep_pruned_at_zero(optax.sgd(0.1, momentum=0.9)).init, jax.eval_shape(lambda: params))
    assert abstract.masks["conv2_1"]["kernel"] == jax.ShapeDtypeStruct(params["conv2_1"]["kernel"].shape, jnp.bool_)
    with pytest.raises(ValueError, match="no prunable leaves"):
        keep_pruned_at_zero(optax.sgd(0.1), prunable=lambda path, leaf: False).init(params)


class _NNXCNN(nnx.Module):
    """conv 3->4 (3x3), BatchNorm, conv 4->6 (3x3), global average pool, linear 6->2."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.conv2(nnx.relu(self.bn(self.conv1(x)))).mean(axis=(1, 2)))


def test_masks_on_an_nnx_state():
    model = _NNXCNN(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masks = magnitude_masks(params, 0.5)
    pruned = apply_masks(params, masks)
    summary = sparsity_summary(pruned)
    assert set(summary["layers"]) == {"conv1/kernel", "conv2/kernel"}
    assert summary["size"] == 3 * 3 * 3 * 4 + 3 * 3 * 4 * 6
    assert abs(summary["zeros"] - 0.5 * summary["size"]) <= 1
    chex.assert_trees_all_equal(pruned["head"], params["head"])
    chex.assert_trees_all_equal(pruned["conv1"]["bias"], params["conv1"]["bias"])
    merged = nnx.merge(graphdef, pruned, rest)
    kernel = np.asarray(merged.conv2.kernel.value)
    np.testing.assert_array_equal(kernel == 0, ~np.asarray(masks["conv2"]["kernel"].value))
    assert merged(jnp.ones((1, 8, 8, 3))).shape == (1, 2)
    # Flattened with NNX's variables as leaves, the paths end at the name itself.
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    assert sorted(jax.tree_util.keystr(path) for path, leaf in flat if conv_kernels(path, leaf)) == [
        "['conv1']['kernel']", "['conv2']['kernel']"]


def test_masks_on_plain_pytrees():
    rng = np.random.default_rng(0)
    kernel, dense = rng.normal(size=(3, 3, 3, 4)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    # stax-style lists of (w, b): a rank-4 array without a name is a conv kernel.
    layers = [(jnp.asarray(kernel), jnp.zeros(4)), (jnp.asarray(dense), jnp.zeros(2))]
    pruned = apply_masks(layers, magnitude_masks(layers, 0.25))
    assert abs(int(np.sum(np.asarray(pruned[0][0]) == 0)) - 0.25 * kernel.size) <= 1
    chex.assert_trees_all_equal(pruned[1], layers[1])
    # PyTorch-style names (``weight``, OIHW) and Haiku's ``w`` are kernels too, at rank 4.
    state = {"features.0": {"weight": jnp.asarray(kernel.transpose(3, 2, 0, 1))}, "fc": {"weight": jnp.asarray(dense)},
             "conv": {"w": jnp.asarray(kernel)}}
    assert set(sparsity_summary(state)["layers"]) == {"features.0/weight", "conv/w"}
    # Any other name is not: choose the leaves with prunable=.
    named = {"conv1": jnp.asarray(kernel)}
    with pytest.raises(ValueError, match="no prunable leaves"):
        magnitude_masks(named, 0.5)
    assert sparsity_summary(named, prunable=lambda path, leaf: leaf.ndim == 4)["size"] == kernel.size


def test_sparsity_summary_of_params_without_prunable_leaves_raises():
    with pytest.raises(ValueError, match="no prunable leaves.*prunable="):
        sparsity_summary({"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}})
