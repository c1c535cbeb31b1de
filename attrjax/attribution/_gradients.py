"""The gradient family of input attributions: saliency, input x gradient, integrated gradients, SmoothGrad and
guided backprop, as batched, jit-able functional transforms.

``logit_fn`` is any callable images (B,S,S,3) -> logits (B,K) (e.g. ``lambda x: model.apply(variables, x)``) whose
rows are independent (eval mode: BatchNorm uses its running statistics, no dropout). One ``jax.vjp`` with the
cotangent w (B,K) from ``target_weights`` then gives, for every image at once, the gradient of its own targeted
logit <w_b, logits_b>. ``target`` is (B,) int classes, (B,K) logit weights, or a callable of the logits (see
``gradcam.Target``).

Integrated gradients and SmoothGrad average gradients over many points per image; the points are evaluated in
chunks of ``chunk_size`` (a scan over chunks with a running sum, ``attrjax._chunking``), so memory is bounded by
chunk_size x B images whatever ``steps``/``samples`` is. The last chunk is padded and the padding masked out.
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from attrjax import _chunking as chunking
from attrjax.attribution._gradcam import Target, target_weights
from attrjax.models._adapters import ModelLike, logits_fn

LogitFn = Callable[[jax.Array], jax.Array]


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass lets through only positive gradients at positive inputs (guided backprop).

    Forward: max(x, 0). Backward: g * (x > 0) * (g > 0) (Springenberg et al., 2015).
    """
    return jax.nn.relu(x)


def _guided_relu_fwd(x: jax.Array):
    return jax.nn.relu(x), x


def _guided_relu_bwd(x: jax.Array, grad: jax.Array):
    return (jnp.where((x > 0) & (grad > 0), grad, jnp.zeros_like(grad)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


def _check_images(images: jax.Array) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of NHWC images (B,S,S,C), got shape {tuple(images.shape)}; add a batch "
                         "axis with images[None] for a single image")
    return images


def _check_positive(name: str, value: int):
    if not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _weighted_gradient(logit_fn: LogitFn, images: jax.Array, weights: jax.Array) -> jax.Array:
    """d sum_b <weights_b, logit_fn(images)_b> / d images, (N,S,S,C) with weights (N,K)."""
    _, vjp_fn = jax.vjp(logit_fn, images)
    (grads,) = vjp_fn(weights)
    return grads


def _weights_at(logit_fn: LogitFn, images: jax.Array, target: Target) -> jax.Array:
    """(B,K) target weights, fixed at the clean images (a callable target sees their logits, not the path's)."""
    # Only a callable target needs the logits' values; the others need their shape, which costs no forward pass.
    logits = logit_fn(images) if callable(target) else jax.eval_shape(logit_fn, images)
    return target_weights(target, logits)


def _chunked_mean_gradient(logit_fn: LogitFn, weights: jax.Array, point: Callable[[jax.Array], jax.Array],
                           num_points: int, chunk_size: int) -> jax.Array:
    """Mean over i in [0, num_points) of the weighted gradient at the images ``point(i)`` (B,S,S,C).

    Points are evaluated ``chunk_size`` at a time as one (chunk_size*B)-image batch; the index range is padded to a
    multiple of the chunk size and the padded points are masked out, so any ``num_points`` works.
    """
    chunk_size = min(chunk_size, num_points)
    num_chunks = -(-num_points // chunk_size)
    indices = jnp.arange(num_chunks * chunk_size).reshape(num_chunks, chunk_size)
    chunk_weights = jnp.tile(weights, (chunk_size, 1))  # row c*B + b belongs to image b

    def add_chunk(total, chunk_indices):
        inputs = jax.vmap(point)(chunk_indices)  # (chunk,B,S,S,C)
        grads = _weighted_gradient(logit_fn, inputs.reshape((-1,) + inputs.shape[2:]), chunk_weights)
        grads = grads.reshape(inputs.shape)
        valid = (chunk_indices < num_points)[:, None, None, None, None]
        return total + jnp.sum(jnp.where(valid, grads, jnp.zeros_like(grads)), axis=0), None

    point_shape = jax.eval_shape(point, indices[0, 0])
    initial = jnp.zeros(point_shape.shape, point_shape.dtype)
    total, _ = chunking.scan(add_chunk, initial, indices)
    return total / num_points


def input_gradients(logit_fn: LogitFn, images: jax.Array, target: Target) -> jax.Array:
    """The plain gradient of each image's targeted logit: images (B,S,S,C) -> gradients (B,S,S,C)."""
    images = _check_images(images)
    logits, vjp_fn = jax.vjp(logit_fn, images)
    (grads,) = vjp_fn(target_weights(target, logits))
    return grads


def saliency(logit_fn: LogitFn, images: jax.Array, target: Target) -> jax.Array:
    """Gradient saliency (Simonyan et al., 2014): max over channels of |d target logit / d input|.

    Args:
      logit_fn: images (B,S,S,C) -> logits (B,K), rows independent.
      images: (B,S,S,C).
      target: (B,) int classes, (B,K) logit weights, or a callable of the logits.

    Returns:
      maps (B,S,S), non-negative.
    """
    return jnp.max(jnp.abs(input_gradients(logit_fn, images, target)), axis=-1)


def input_x_gradient(logit_fn: LogitFn, images: jax.Array, target: Target) -> jax.Array:
    """Input x gradient: sum over channels of x * d target logit / dx, images (B,S,S,C) -> maps (B,S,S).

    For a linear model it is each pixel's exact contribution to the targeted logit (signed).
    """
    images = _check_images(images)
    return sum_channels(images * input_gradients(logit_fn, images, target))


def sum_channels(attributions: jax.Array) -> jax.Array:
    """Collapses channel-resolved attributions (B,S,S,C) -> maps (B,S,S) by summing (keeps completeness)."""
    return jnp.sum(attributions, axis=-1)


def integrated_gradients(logit_fn: LogitFn, images: jax.Array, target: Target, *, baseline: jax.Array | None = None,
                         steps: int = 32, chunk_size: int = 8) -> jax.Array:
    """Integrated gradients (Sundararajan et al., 2017) with the midpoint Riemann rule.

    attr = (x - x0) * (1/steps) sum_{k=0}^{steps-1} grad f(x0 + (k + 1/2)/steps * (x - x0)). The midpoint rule's
    error falls as 1/steps^2 for smooth f (a left or right sum's as 1/steps), so completeness,
    ``sum(attr) ~= f(x) - f(x0)``, holds to within that error; ReLU kinks make it converge somewhat slower.

    Args:
      logit_fn: images (B,S,S,C) -> logits (B,K), rows independent.
      images: x, (B,S,S,C).
      target: (B,) int classes, (B,K) logit weights, or a callable evaluated once on the logits of ``images``
        (the same target along the whole path).
      baseline: x0, broadcastable to ``images`` (e.g. (S,S,C) for all images); None for black (zeros).
      steps: number of path points (>= 1).
      chunk_size: path points per batched gradient call (>= 1); memory grows with chunk_size x B images. Need not
        divide ``steps``.

    Returns:
      channel-resolved attributions (B,S,S,C); ``sum_channels`` gives maps (B,S,S).
    """
    images = _check_images(images)
    _check_positive("steps", steps)
    _check_positive("chunk_size", chunk_size)
    if baseline is None:
        baseline = jnp.zeros_like(images)
    else:
        baseline = jnp.asarray(baseline, images.dtype)
        try:
            baseline = jnp.broadcast_to(baseline, images.shape)
        except ValueError:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the images' shape "
                             f"{tuple(images.shape)}") from None
    weights = _weights_at(logit_fn, images, target)
    delta = images - baseline

    def point(index):
        return baseline + ((index + 0.5) / steps).astype(images.dtype) * delta

    return delta * _chunked_mean_gradient(logit_fn, weights, point, steps, chunk_size)


def smooth_grad(logit_fn: LogitFn, images: jax.Array, target: Target, *, rng: jax.Array, noise_level: float = 0.15,
                samples: int = 16, chunk_size: int = 8) -> jax.Array:
    """SmoothGrad (Smilkov et al., 2017): the mean gradient over Gaussian-noised copies of each image.

    The noise of image b has standard deviation noise_level * (max(x_b) - min(x_b)). Sample i's noise is drawn
    from ``jax.random.fold_in(rng, i)``, so the result does not depend on ``chunk_size``.

    Args:
      logit_fn: images (B,S,S,C) -> logits (B,K), rows independent.
      images: (B,S,S,C).
      target: (B,) int classes, (B,K) logit weights, or a callable evaluated once on the logits of the clean
        ``images`` (the same target for every noisy copy).
      rng: a PRNG key.
      noise_level: noise scale as a fraction of each image's value range (>= 0; 0 gives the plain gradient).
      samples: number of noisy copies (>= 1).
      chunk_size: copies per batched gradient call (>= 1); need not divide ``samples``.

    Returns:
      the mean signed gradient, channel-resolved (B,S,S,C); take ``jnp.max(jnp.abs(.), -1)`` for a saliency-style
      map or multiply by the images and ``sum_channels`` for a SmoothGrad input x gradient map.
    """
    images = _check_images(images)
    _check_positive("samples", samples)
    _check_positive("chunk_size", chunk_size)
    if not noise_level >= 0:  # also rejects NaN
        raise ValueError(f"noise_level must be >= 0 (a fraction of each image's value range), got {noise_level}")
    weights = _weights_at(logit_fn, images, target)
    value_range = jnp.max(images, axis=(1, 2, 3), keepdims=True) - jnp.min(images, axis=(1, 2, 3), keepdims=True)
    sigma = noise_level * value_range

    def point(index):
        # Drawn flat: the same numbers as a (B, H, W, C) draw, which XLA:CPU compiles about 5x slower.
        noise = jax.random.normal(jax.random.fold_in(rng, index), (images.size,), images.dtype).reshape(images.shape)
        return images + sigma * noise

    return _chunked_mean_gradient(logit_fn, weights, point, samples, chunk_size)


def _is_relu(eqn) -> bool:
    """``max(x, 0)`` with a literal zero: how ``jax.nn.relu`` (and linen's and NNX's relu) reach the jaxpr."""
    return eqn.primitive.name == "max" and any(
        isinstance(atom, jax_core.Literal) and jnp.ndim(atom.val) == 0 and atom.val == 0 for atom in eqn.invars)


def _contains_relu(jaxpr) -> bool:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(_is_relu(eqn) or any(map(_contains_relu, jax_core.jaxprs_in_params(eqn.params))) for eqn in jaxpr.eqns)


def _eval_guided(jaxpr, consts, args) -> list:
    """Evaluates ``jaxpr`` with every ReLU replaced by ``guided_relu``, inside ``jit`` and ``custom_jvp`` calls too."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))

    def read(atom):
        return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    for eqn in jaxpr.eqns:
        values = [read(atom) for atom in eqn.invars]
        name = eqn.primitive.name
        if _is_relu(eqn):
            x = next(value for atom, value in zip(eqn.invars, values) if not isinstance(atom, jax_core.Literal))
            outs = [guided_relu(jnp.broadcast_to(x, eqn.outvars[0].aval.shape))]
        elif name in ("custom_jvp_call", "pjit", "jit"):  # the ReLU's own jvp is replaced, so the rule can go
            closed = eqn.params["call_jaxpr" if name == "custom_jvp_call" else "jaxpr"]
            outs = _eval_guided(closed.jaxpr, closed.consts, values)
        elif any(map(_contains_relu, jax_core.jaxprs_in_params(eqn.params))):
            raise ValueError(f"guided backprop cannot reach the ReLUs inside a {name!r} of this model's forward pass; "
                             "unroll that loop/branch, or attribute with another method")
        else:
            outs = eqn.primitive.bind(*values, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(atom) for atom in jaxpr.outvars]


def guided_logits_fn(forward: Callable[[jax.Array], jax.Array],
                     images: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``forward`` (images -> logits) with every ReLU replaced by ``guided_relu``: the same logits, guided gradients.

    The forward pass is traced once for images shaped like ``images``; ReLUs are found in its jaxpr as ``max(x, 0)``,
    so ``jax.nn.relu``, ``flax.linen.relu``, ``flax.nnx.relu`` and ``jnp.maximum(x, 0)`` are all replaced, however
    the model calls them. Raises ValueError when the pass has no ReLU at all (e.g. ReLU written as
    ``jnp.where(x > 0, x, 0)``) or hides one inside a loop or branch.
    """
    closed = jax.make_jaxpr(forward)(images)
    if not _contains_relu(closed):
        raise ValueError("found no ReLU (max(x, 0)) in the model's forward pass to guide; guided backprop needs "
                         "ReLU activations")
    return lambda x: _eval_guided(closed.jaxpr, closed.consts, [x])[0]


def guided_backprop(model: ModelLike, variables: dict, images: jax.Array, target: Target) -> jax.Array:
    """Guided backprop (Springenberg et al., 2015): the input gradient of the network with every ReLU's backward
    pass guided (``guided_relu``), for any model.

    Args:
      model: anything ``attrjax.models.as_split_model`` takes (attrjax's VGG, a Flax linen or NNX classifier, a
        split model), applied in eval mode; its ReLUs are found in the forward pass's jaxpr (``guided_logits_fn``).
      variables: the model's variables (same for the guided network: only the backward pass changes).
      images: (B,S,S,C).
      target: (B,) int classes, (B,K) logit weights, or a callable of the logits.

    Returns:
      guided gradients (B,S,S,C).
    """
    images = _check_images(images)
    return input_gradients(guided_logits_fn(logits_fn(model, variables), images), images, target)


__all__ = ["guided_backprop", "guided_logits_fn", "guided_relu", "input_gradients", "input_x_gradient",
           "integrated_gradients", "saliency", "smooth_grad", "sum_channels"]
