"""The gradient family against closed forms (linear model), identities (completeness of integrated gradients) and
a NumPy guided-backprop reference; chunking, jit and vmap leave results unchanged; bad inputs fail clearly."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax.attribution._gradients import (guided_backprop, guided_logits_fn, guided_relu, input_gradients,
                                           input_x_gradient, integrated_gradients, saliency, smooth_grad,
                                           sum_channels)
from attrjax.models import init_variables, vgg

B, S, K = 2, 6, 4


@pytest.fixture(scope="module")
def linear_model():
    keys = jax.random.split(jax.random.key(0), 2)
    weights = draws.normal(keys[0], (S * S * 3, K))
    images = draws.normal(keys[1], (B, S, S, 3))

    def logit_fn(x):
        return x.reshape(x.shape[0], -1) @ weights + 1.0

    return logit_fn, images, np.asarray(weights).reshape(S, S, 3, K)


@pytest.fixture(scope="module")
def tiny_vgg():
    model = vgg(((4,), (8,)), num_classes=3, image_size=8, head_pooling="avg")
    variables = jax.jit(init_variables, static_argnums=0)(model, jax.random.key(1))
    images = draws.uniform(jax.random.key(2), (B, 8, 8, 3))
    return model, variables, images, jax.jit(lambda x: model.apply(variables, x))


def test_saliency_and_input_x_gradient_of_a_linear_model_are_closed_forms(linear_model):
    logit_fn, images, weights = linear_model
    target = jnp.array([1, 3])
    columns = np.moveaxis(weights[..., np.asarray(target)], -1, 0)  # (B,S,S,3): W[:, t_b] per image
    maps = saliency(logit_fn, images, target)
    chex.assert_shape(maps, (B, S, S))
    np.testing.assert_allclose(maps, np.abs(columns).max(-1), rtol=1e-6)
    np.testing.assert_allclose(input_x_gradient(logit_fn, images, target),
                               (np.asarray(images) * columns).sum(-1), rtol=1e-5, atol=1e-5)


def test_weight_and_callable_targets(linear_model):
    logit_fn, images, weights = linear_model
    class_weights = draws.uniform(jax.random.key(3), (B, K))
    expected = np.einsum("hwck,bk->bhwc", weights, np.asarray(class_weights))
    np.testing.assert_allclose(input_gradients(logit_fn, images, class_weights), expected, rtol=1e-5, atol=1e-5)
    top1 = jnp.argmax(logit_fn(images), axis=-1)
    chex.assert_trees_all_close(saliency(logit_fn, images, lambda logits: jnp.argmax(logits, -1)),
                                saliency(logit_fn, images, top1))


def test_integrated_gradients_of_a_linear_model_is_input_x_gradient(linear_model):
    logit_fn, images, _ = linear_model
    target = jnp.array([0, 2])
    attributions = integrated_gradients(logit_fn, images, target, steps=3)
    chex.assert_shape(attributions, (B, S, S, 3))
    chex.assert_trees_all_close(sum_channels(attributions), input_x_gradient(logit_fn, images, target),
                                rtol=1e-5, atol=1e-5)


def test_integrated_gradients_completeness_improves_with_steps(tiny_vgg):
    _, _, _, logit_fn = tiny_vgg
    images = 3.0 * draws.normal(jax.random.key(10), (B, 8, 8, 3))  # far from the baseline: a gap of ~0.5
    target = jnp.array([0, 2])
    baseline = jnp.full((8, 8, 3), 0.5)  # one baseline broadcast to every image
    gap = (logit_fn(images) - logit_fn(jnp.broadcast_to(baseline, images.shape)))[jnp.arange(B), target]

    def completeness_error(steps):
        attributions = integrated_gradients(logit_fn, images, target, baseline=baseline, steps=steps)
        return float(jnp.max(jnp.abs(attributions.sum(axis=(1, 2, 3)) - gap)))

    coarse, fine = completeness_error(4), completeness_error(64)
    assert fine < 0.25 * coarse, (coarse, fine)
    assert fine < 2e-3 * float(jnp.max(jnp.abs(gap))), (fine, gap)


def test_integrated_gradients_chunking_does_not_change_the_result(tiny_vgg):
    _, _, images, logit_fn = tiny_vgg
    target = jnp.array([1, 0])
    whole = integrated_gradients(logit_fn, images, target, steps=7, chunk_size=7)
    for chunk_size in (1, 3, 16):  # 3 pads the last chunk, 16 > steps
        chex.assert_trees_all_close(integrated_gradients(logit_fn, images, target, steps=7, chunk_size=chunk_size),
                                    whole, rtol=1e-5, atol=1e-6)


def test_smooth_grad_is_the_mean_gradient_over_its_noisy_copies(tiny_vgg):
    _, _, images, logit_fn = tiny_vgg
    target = jnp.array([2, 1])
    rng = jax.random.key(4)
    result = smooth_grad(logit_fn, images, target, rng=rng, noise_level=0.2, samples=5, chunk_size=2)
    chex.assert_shape(result, (B, 8, 8, 3))
    value_range = images.max(axis=(1, 2, 3), keepdims=True) - images.min(axis=(1, 2, 3), keepdims=True)
    gradient = jax.jit(lambda x, t: input_gradients(logit_fn, x, t))
    reference = np.mean([gradient(images + 0.2 * value_range * draws.normal(jax.random.fold_in(rng, i),
                                                                                  images.shape), target)
                         for i in range(5)], axis=0)
    np.testing.assert_allclose(result, reference, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(smooth_grad(logit_fn, images, target, rng=rng, noise_level=0.2, samples=5,
                                            chunk_size=5), result, rtol=1e-5, atol=1e-7)
    other = smooth_grad(logit_fn, images, target, rng=jax.random.key(5), noise_level=0.2, samples=5, chunk_size=2)
    assert not np.allclose(other, result)


def test_smooth_grad_without_noise_is_the_plain_gradient(tiny_vgg):
    _, _, images, logit_fn = tiny_vgg
    target = jnp.array([0, 1])
    chex.assert_trees_all_close(smooth_grad(logit_fn, images, target, rng=jax.random.key(0), noise_level=0.0,
                                            samples=3), input_gradients(logit_fn, images, target),
                                rtol=1e-5, atol=1e-7)


def test_guided_relu_matches_numpy():
    x = draws.normal(jax.random.key(6), (5, 7))
    grad = draws.normal(jax.random.key(7), (5, 7))
    out, vjp_fn = jax.vjp(guided_relu, x)
    np.testing.assert_array_equal(out, np.maximum(np.asarray(x), 0))
    (x_grad,) = vjp_fn(grad)
    x_np, grad_np = np.asarray(x), np.asarray(grad)
    np.testing.assert_array_equal(x_grad, grad_np * (x_np > 0) * (grad_np > 0))


def test_guided_gradient_of_one_conv_layer_matches_numpy():
    """logits = mean_{h,w} act(conv3x3(x)) @ V; the guided gradient written out by hand (im2col and its adjoint)."""
    keys = jax.random.split(jax.random.key(8), 3)
    kernel = draws.normal(keys[0], (3, 3, 3, 5))
    readout = draws.normal(keys[1], (5, K))
    images = draws.normal(keys[2], (B, S, S, 3))
    target = jnp.array([3, 0])

    def logit_fn(x):
        z = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(guided_relu(z), axis=(1, 2)) @ readout

    x, kernel_np = np.asarray(images), np.asarray(kernel)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([np.stack([padded[:, i:i + S, j:j + S] for j in range(3)], 3) for i in range(3)], 3)
    z = np.einsum("bhwijc,ijcf->bhwf", patches, kernel_np)
    act_grad = np.broadcast_to((np.eye(K)[np.asarray(target)] @ np.asarray(readout).T)[:, None, None, :] / S**2,
                               z.shape)
    z_grad = act_grad * (z > 0) * (act_grad > 0)
    patch_grad = np.einsum("bhwf,ijcf->bhwijc", z_grad, kernel_np)
    padded_grad = np.zeros_like(padded)
    for i in range(3):
        for j in range(3):
            padded_grad[:, i:i + S, j:j + S] += patch_grad[:, :, :, i, j]
    np.testing.assert_allclose(input_gradients(logit_fn, images, target), padded_grad[:, 1:-1, 1:-1],
                               rtol=1e-4, atol=1e-6)


def test_guided_vgg_has_the_same_logits_and_a_guided_gradient(tiny_vgg):
    model, variables, images, logit_fn = tiny_vgg
    guided = model.clone(activation=guided_relu)
    chex.assert_trees_all_close(guided.apply(variables, images), logit_fn(images))
    target = jnp.array([1, 2])
    guided_grads = guided_backprop(model, variables, images, target)
    chex.assert_shape(guided_grads, images.shape)
    assert np.abs(np.asarray(guided_grads)).sum() > 0
    assert not np.allclose(guided_grads, input_gradients(logit_fn, images, target))
    assert model.activation is nn.relu  # the default network is untouched


def test_jit_matches_eager(tiny_vgg):
    model, variables, images, logit_fn = tiny_vgg
    target = jnp.array([2, 0])
    rng = jax.random.key(9)
    # The target is a jit argument: target_weights' range check cannot run on a constant staged inside jit.
    methods = {
        "saliency": lambda x, t: saliency(logit_fn, x, t),
        "input_x_gradient": lambda x, t: input_x_gradient(logit_fn, x, t),
        "integrated_gradients": lambda x, t: integrated_gradients(logit_fn, x, t, steps=5, chunk_size=2),
        "smooth_grad": lambda x, t: smooth_grad(logit_fn, x, t, rng=rng, samples=3, chunk_size=2),
        "guided_backprop": lambda x, t: guided_backprop(model, variables, x, t),
    }
    for name, method in methods.items():
        chex.assert_trees_all_close(jax.jit(method)(images, target), method(images, target), rtol=1e-5, atol=1e-6,
                                    custom_message=name)


def test_vmap_over_groups_of_images_matches_a_loop(linear_model):
    logit_fn, images, _ = linear_model
    groups = jnp.stack([images, -2.0 * images])  # (G,B,S,S,3)
    targets = jnp.array([[0, 1], [3, 2]])
    for method in (saliency, lambda f, x, t: integrated_gradients(f, x, t, steps=3, chunk_size=2)):
        batched = jax.vmap(lambda x, t: method(logit_fn, x, t))(groups, targets)
        for g in range(2):
            chex.assert_trees_all_close(batched[g], method(logit_fn, groups[g], targets[g]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda f, x, t: saliency(f, x[0], t), r"\(B,S,S,C\)"),
    (lambda f, x, t: saliency(f, x, jnp.array([0, K])), r"\[0, 4\)"),
    (lambda f, x, t: integrated_gradients(f, x, t, steps=0), "steps must be a positive integer"),
    (lambda f, x, t: integrated_gradients(f, x, t, chunk_size=0), "chunk_size must be a positive integer"),
    (lambda f, x, t: integrated_gradients(f, x, t, baseline=jnp.zeros((3, 3, 3))), "does not broadcast"),
    (lambda f, x, t: smooth_grad(f, x, t, rng=jax.random.key(0), samples=0), "samples must be a positive integer"),
    (lambda f, x, t: smooth_grad(f, x, t, rng=jax.random.key(0), noise_level=-0.1), "noise_level must be >= 0"),
])
def test_bad_inputs_raise_clear_errors(linear_model, call, message):
    logit_fn, images, _ = linear_model
    with pytest.raises(ValueError, match=message):
        call(logit_fn, images, jnp.array([0, 1]))


def test_guided_backprop_of_the_vgg_equals_swapping_its_activation(tiny_vgg):
    """The jaxpr rewrite finds every ReLU: the same guided gradient as building the VGG with guided_relu."""
    model, variables, images, _ = tiny_vgg
    target = jnp.array([1, 2])
    swapped = input_gradients(lambda x: model.clone(activation=guided_relu).apply(variables, x), images, target)
    chex.assert_trees_all_close(guided_backprop(model, variables, images, target), swapped, rtol=1e-5, atol=1e-7)


class _UserCNN(nn.Module):
    """ReLU written three ways; a user's model has no activation field."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = jax.nn.relu(nn.Conv(4, (3, 3))(x))
        x = jnp.maximum(nn.Conv(4, (3, 3))(x), 0.0)
        return nn.Dense(K)(jnp.mean(x, axis=(1, 2)))


def test_guided_backprop_of_a_users_linen_model_matches_a_hand_guided_copy():
    images = draws.normal(jax.random.key(1), (B, S, S, 3))
    model = _UserCNN()
    variables = model.init(jax.random.key(0), images)
    params = variables["params"]

    def hand_guided(x):  # the same network with guided_relu written in by hand
        for name in ("Conv_0", "Conv_1", "Conv_2"):
            x = guided_relu(nn.Conv(4, (3, 3)).apply({"params": params[name]}, x))
        return nn.Dense(K).apply({"params": params["Dense_0"]}, jnp.mean(x, axis=(1, 2)))

    target = jnp.array([0, 3])
    guided = guided_backprop(model, variables, images, target)
    chex.assert_trees_all_close(guided, input_gradients(hand_guided, images, target), rtol=1e-5, atol=1e-7)
    assert not np.allclose(guided, input_gradients(lambda x: model.apply(variables, x), images, target))


def test_guided_backprop_without_relus_or_with_relus_in_a_loop_fails_loudly():
    images = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="found no ReLU"):
        guided_logits_fn(lambda x: jnp.tanh(x).reshape(1, -1), images)

    def looped(x):
        return jax.lax.fori_loop(0, 2, lambda i, h: jax.nn.relu(h) - 0.5, x).reshape(1, -1)

    with pytest.raises(ValueError, match="cannot reach the ReLUs inside a 'scan'"):
        guided_logits_fn(looped, images)(images)
