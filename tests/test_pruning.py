"""Unstructured magnitude pruning: thresholds, the iterative schedule, exact zeros under optimisation, checkpoints."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attrjax.models import init_variables, vgg
from attrjax.pruning import (apply_masks, iterative_sparsity, magnitude_masks, masked, sparsity_summary)
from attrjax.train import Objective, TrainState, checkpoint_manager, restore_latest, sgd, train
from attrjax.train.checkpoint import save

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

    state, _ = train(MODEL, variables, masked(sgd(0.1, momentum=0.9, weight_decay=1e-2), masks), Objective(),
                     batches, 30, rng=jax.random.key(1), log=lambda _: None)
    for name in ("conv1_1", "conv2_1", "conv2_2"):
        kernel, keep = np.asarray(state.params[name]["kernel"]), np.asarray(masks[name]["kernel"])
        assert np.all(kernel[~keep] == 0.0)
        assert np.any(kernel[keep] != np.asarray(params[name]["kernel"])[keep])  # the kept weights did train


def test_masks_survive_a_checkpoint_round_trip(tmp_path):
    params = _params()
    masks = magnitude_masks(params, 0.5)
    tx = masked(optax.sgd(0.1, momentum=0.9), masks)
    state = TrainState.create(dict(init_variables(MODEL, jax.random.key(0)), params=apply_masks(params, masks)), tx)
    manager = checkpoint_manager(str(tmp_path), save_every=1)
    save(manager, state, force=True)
    manager.wait_until_finished()
    fresh_masks = magnitude_masks(_params(seed=7), 0.5)  # a different mask of the same structure
    template = TrainState.create(init_variables(MODEL, jax.random.key(7)), masked(optax.sgd(0.1, momentum=0.9),
                                                                                   fresh_masks))
    restored = restore_latest(manager, template)
    chex.assert_trees_all_equal(jax.device_get(restored.opt_state.masks), jax.device_get(masks))


def test_restoring_masks_into_another_architecture_fails_clearly(tmp_path):
    params = _params()
    masks = magnitude_masks(params, 0.5)
    state = TrainState.create(init_variables(MODEL, jax.random.key(0)), masked(optax.sgd(0.1), masks))
    manager = checkpoint_manager(str(tmp_path), save_every=1)
    save(manager, state, force=True)
    manager.wait_until_finished()
    other = vgg(((4,), (8, 8)), num_classes=4, image_size=16, attribution_layer="pool2")
    other_params = init_variables(other, jax.random.key(0))["params"]
    template = TrainState.create(init_variables(other, jax.random.key(0)),
                                 masked(optax.sgd(0.1), magnitude_masks(other_params, 0.5)))
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
        masked(optax.sgd(0.1), masks).init(params)
    wrong_shape = jax.tree.map(lambda m: m, magnitude_masks(params, 0.5))
    wrong_shape["conv1_1"]["kernel"] = jnp.ones((1, 1, 3, 8), bool)
    with pytest.raises(ValueError, match="shape"):
        apply_masks(params, wrong_shape)
    chex.assert_trees_all_equal(apply_masks(params, magnitude_masks(params, 0.0)), params)
