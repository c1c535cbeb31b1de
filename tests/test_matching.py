"""The matching regulariser: closed form, finite at zero maps, stochastic draws, and its double-backprop gradient
against finite differences through a real (tiny) model."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax._matching import matching_loss, normalize_maps, stochastic_channel_keep
from attrjax.models import init_variables, vgg
from attrjax.training import Objective, make_loss_fn


def test_matching_loss_matches_numpy():
    rng = np.random.default_rng(0)
    teacher, student = rng.random((4, 3, 5)), rng.random((4, 3, 5))

    def unit(m):
        flat = m.reshape(4, -1)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    expected = np.mean((unit(teacher) - unit(student)) ** 2)
    np.testing.assert_allclose(matching_loss(jnp.asarray(teacher), jnp.asarray(student)), expected, rtol=1e-5)


def test_matching_loss_is_scale_invariant_and_zero_for_equal_shapes():
    maps = draws.uniform(jax.random.key(0), (2, 7, 7))
    np.testing.assert_allclose(matching_loss(maps, 5.0 * maps), 0.0, atol=1e-7)


def test_zero_maps_stay_finite_with_finite_gradients():
    teacher = draws.uniform(jax.random.key(0), (2, 3, 3))
    zeros = jnp.zeros((2, 3, 3))
    loss, grads = jax.value_and_grad(lambda s: matching_loss(teacher, s))(zeros)
    # A zero student map normalises to zero: the loss is the mean of the teacher's squared unit map = 1/(H*W).
    np.testing.assert_allclose(loss, 1 / 9, rtol=1e-5)
    chex.assert_tree_all_finite(grads)
    chex.assert_tree_all_finite(jax.grad(lambda t: matching_loss(t, zeros))(zeros))
    np.testing.assert_array_equal(normalize_maps(zeros), 0.0)


def test_teacher_maps_get_no_gradient():
    teacher, student = draws.uniform(jax.random.key(0), (2, 2, 4, 4))
    np.testing.assert_array_equal(jax.grad(lambda t: matching_loss(t, student))(teacher), 0.0)


def test_mismatched_maps_are_rejected():
    with pytest.raises(ValueError, match="same spatial size"):
        matching_loss(jnp.zeros((2, 7, 7)), jnp.zeros((2, 8, 8)))


@pytest.mark.parametrize("shape", [(4,), (4, 9), (2, 1, 3, 3)])
def test_maps_of_another_rank_are_rejected(shape):
    # (B,) would be normalised to +-1 per sample and give a plausible loss; (B, C, H, W) would merge C maps.
    with pytest.raises(ValueError, match=r"teacher_maps must have rank 3 \(B, H, W\), got shape " + re.escape(
            str(shape))):
        matching_loss(jnp.ones(shape), jnp.ones(shape))
    with pytest.raises(ValueError, match=r"student_maps must have rank 3 \(B, H, W\)"):
        matching_loss(jnp.ones((2, 3, 3)), jnp.ones(shape))


@pytest.mark.parametrize("channels,rate,dropped", [(512, 0.1, 51), (512, 0.3, 153), (64, 0.0, 0), (10, 0.95, 9)])
def test_stochastic_keep_drops_floor_of_rate_times_channels(channels, rate, dropped):
    keep = stochastic_channel_keep(jax.random.key(0), channels, rate)
    chex.assert_shape(keep, (channels,))
    assert int(jnp.sum(keep == 0)) == dropped
    other = stochastic_channel_keep(jax.random.key(1), channels, rate)
    assert dropped == 0 or not np.array_equal(keep, other)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_stochastic_rate_outside_unit_interval_is_rejected(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stochastic_channel_keep(jax.random.key(0), 8, rate)


def test_double_backprop_gradient_matches_finite_differences():
    """d(KD + lambda * matching)/d(student params) through the student's own Grad-CAM, in float64."""
    with jax.enable_x64(True):
        kwargs = dict(num_classes=3, image_size=8, attribution_layer="pool2", dtype=jnp.float64)
        teacher = vgg(((4,), (4,)), **kwargs)
        student = vgg(((2,), (3,)), **kwargs)
        to64 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64), tree)  # noqa: E731
        teacher_vars = to64(init_variables(teacher, jax.random.key(0)))
        student_vars = to64(init_variables(student, jax.random.key(1)))
        batch = {"image": draws.normal(jax.random.key(2), (4, 8, 8, 3), jnp.float64),
                 "labels": jnp.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], jnp.float64)}
        objective = Objective(kd="binary", matching="weighted", matching_weight=10.0, matching_layer="pool2")
        loss_fn = make_loss_fn(student, objective, teacher)

        def loss(params):
            return loss_fn(params, student_vars["batch_stats"], teacher_vars, batch, jax.random.key(3))[0]

        params = student_vars["params"]
        grads = jax.jit(jax.grad(loss))(params)
        loss = jax.jit(loss)  # (compiled once for both shifted evaluations)
        leaves, treedef = jax.tree.flatten(params)
        direction = jax.tree.unflatten(treedef, [draws.normal(jax.random.key(10 + i), x.shape, x.dtype)
                                                 for i, x in enumerate(leaves)])
        eps = 1e-6
        shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)  # noqa: E731
        numeric = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5)
        # The matching term alone must contribute: its gradient reaches the classifier through alpha.
        match_only = make_loss_fn(student, Objective(matching="weighted", matching_weight=1.0,
                                                     matching_layer="pool2", kd="binary", kd_alpha=0.0,
                                                     temperature=1.0), teacher)
        classifier_grad = jax.jit(jax.grad(lambda p: match_only(p, student_vars["batch_stats"], teacher_vars, batch,
                                                                jax.random.key(3))[1][1]["matching_loss"]))(params)
        assert float(jnp.abs(classifier_grad["classifier"]["kernel"]).sum()) > 0
