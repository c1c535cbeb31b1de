"""Grad-CAM transforms against closed forms on a linear head."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax.attribution import (activation_collapse, grad_cam, grad_cam_all_classes, minmax_normalize, resize_maps,
                                 sensitivities_and_logits, top1_target)

B, H, W, C, K = 3, 4, 5, 6, 7


@pytest.fixture()
def linear_head():
    keys = jax.random.split(jax.random.key(0), 3)
    weights = draws.normal(keys[0], (H, W, C, K))
    features = draws.normal(keys[1], (B, H, W, C))

    def head(a):
        return jnp.einsum("bhwc,hwck->bk", a, weights) + 1.0

    return head, features, np.asarray(weights), np.asarray(features)


def _closed_form(weights, features, class_weights, relu=True):
    """For a linear head, alpha_{b,c} = sum_k w_{b,k} sum_{h,w} W[h,w,c,k]; map = sum_c alpha_{b,c} A_{b,:,:,c}."""
    alpha = np.einsum("bk,hwck->bc", class_weights, weights)
    maps = np.einsum("bhwc,bc->bhw", features, alpha)
    return np.maximum(maps, 0) if relu else maps


@pytest.mark.oldest
def test_grad_cam_matches_closed_form_for_int_targets(linear_head):
    head, features, weights, feats_np = linear_head
    target = jnp.array([0, 3, 6])
    maps = grad_cam(head, features, target)
    chex.assert_shape(maps, (B, H, W))
    np.testing.assert_allclose(maps, _closed_form(weights, feats_np, np.eye(K)[np.asarray(target)]), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(grad_cam(head, features, target, relu=False),
                               _closed_form(weights, feats_np, np.eye(K)[np.asarray(target)], relu=False),
                               rtol=1e-5, atol=1e-4)


def test_grad_cam_with_weight_targets_is_linear_in_the_weights(linear_head):
    head, features, weights, feats_np = linear_head
    class_weights = draws.uniform(jax.random.key(3), (B, K))
    np.testing.assert_allclose(grad_cam(head, features, class_weights, relu=False),
                               _closed_form(weights, feats_np, np.asarray(class_weights), relu=False),
                               rtol=1e-4, atol=1e-4)


def test_callable_target_sees_this_forward_pass(linear_head):
    head, features, _, _ = linear_head
    alpha, logits = sensitivities_and_logits(head, features, top1_target)
    expected, _ = sensitivities_and_logits(head, features, jnp.argmax(head(features), -1))
    chex.assert_trees_all_close(alpha, expected)
    chex.assert_trees_all_close(logits, head(features))


def test_all_classes_at_once_equals_one_class_at_a_time(linear_head):
    head, features, _, _ = linear_head
    maps, logits = jax.jit(lambda f: grad_cam_all_classes(head, f))(features)
    chex.assert_shape(maps, (B, K, H, W))
    for k in range(K):
        chex.assert_trees_all_close(maps[:, k], grad_cam(head, features, jnp.full((B,), k)), atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(logits, head(features), atol=1e-4, rtol=1e-5)


@pytest.mark.oldest
def test_maps_are_differentiable_through_the_head(linear_head):
    """d/dA of sum(relu=False map) for a linear head: sum_hw of map = sum_c alpha_c sum_hw A_c, so the gradient
    w.r.t. A[b,h,w,c] is alpha_{b,c} (alpha does not depend on A)."""
    head, features, weights, _ = linear_head
    target = jnp.array([1, 2, 3])
    grads = jax.grad(lambda a: jnp.sum(grad_cam(head, a, target, relu=False)))(features)
    alpha = np.einsum("bk,hwck->bc", np.eye(K)[np.asarray(target)], weights)
    np.testing.assert_allclose(grads, np.broadcast_to(alpha[:, None, None, :], grads.shape), rtol=1e-5, atol=1e-4)


def test_bad_targets_are_rejected(linear_head):
    head, features, _, _ = linear_head
    with pytest.raises(ValueError, match=r"lie in \[0, 7\)"):
        grad_cam(head, features, jnp.array([0, 7, 1]))
    with pytest.raises(ValueError, match="shape"):
        grad_cam(head, features, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="logits' shape"):
        grad_cam(head, features, jnp.ones((B, K + 1)))


def test_activation_collapse_minmax_and_resize():
    features = draws.normal(jax.random.key(0), (2, 3, 3, 4))
    np.testing.assert_allclose(activation_collapse(features), np.mean(np.asarray(features) ** 2, -1), rtol=1e-6)
    normalized = minmax_normalize(jnp.arange(18.0).reshape(2, 3, 3))
    np.testing.assert_allclose(normalized.min(axis=(1, 2)), 0.0)
    np.testing.assert_allclose(normalized.max(axis=(1, 2)), 8 / (8 + 1e-5), rtol=1e-6)
    constant = resize_maps(jnp.full((2, 5, 7, 7), 3.0), 28)
    chex.assert_shape(constant, (2, 5, 28, 28))
    np.testing.assert_allclose(constant, 3.0, rtol=1e-6)
