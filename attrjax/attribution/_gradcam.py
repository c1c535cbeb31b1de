"""Weighted collapsed attribution (Grad-CAM at any layer) as functional JAX transforms.

A classifier is split into ``features`` (images -> A, (B,H,W,C)) and ``head_fn`` (A -> logits, (B,K)). One
``jax.vjp`` of ``head_fn`` gives the logits and, for any cotangent, the gradient of the targeted logits w.r.t. A;
the channel sensitivities are its spatial sum (Grad-CAM without the 1/Z that normalisation removes; see
docs/method.md#weighted-collapsed-attribution).
Everything here is differentiable, so a student's map can sit inside a loss that ``jax.grad`` differentiates
(double backprop).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

# A target is (B,) int classes, (B,K) weights on the logits, or a function logits (B,K) -> either of those
# (e.g. ``top1_target`` for the paper's training-time target).
Target = Union[jax.Array, Callable[[jax.Array], jax.Array]]
HeadFn = Callable[[jax.Array], jax.Array]


def top1_target(logits: jax.Array) -> jax.Array:
    """The paper's training target: the (B,) arg-max class of each row of ``logits`` (B,K)."""
    return jnp.argmax(logits, axis=-1)


def target_weights(target: Target, logits: jax.Array) -> jax.Array:
    """Resolves a target into (B,K) weights on ``logits`` (B,K).

    Integer targets become one-hot rows; they are range-checked whenever their values are concrete (not traced).
    """
    if callable(target):
        target = target(jax.lax.stop_gradient(logits))
    batch, num_classes = logits.shape
    # Range-check concrete integer targets with NumPy, before jnp.asarray (which stages constants under jit).
    traced = isinstance(target, jax.core.Tracer)
    concrete = np.asarray(target) if not traced and jnp.issubdtype(jnp.result_type(target), jnp.integer) else None
    target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.shape != (batch,):
            raise ValueError(f"integer targets must have shape (batch,)=({batch},), got {target.shape}")
        if concrete is not None and ((concrete < 0) | (concrete >= num_classes)).any():
            raise ValueError(f"target classes must lie in [0, {num_classes}), got {concrete.tolist()}")
        return jax.nn.one_hot(target, num_classes, dtype=logits.dtype)
    if target.shape != logits.shape:
        raise ValueError(f"target weights must have the logits' shape {logits.shape}, got {target.shape}")
    return target.astype(logits.dtype)


def sensitivities_and_logits(head_fn: Callable[[jax.Array], Any], features: jax.Array, target: Target, *,
                             has_aux: bool = False) -> tuple:
    """Channel sensitivities alpha (B,C) = spatial sum of d(target . logits)/dA, and the logits (B,K).

    Args:
      head_fn: A (B,H,W,C) -> logits (B,K), or -> (logits, aux) when ``has_aux``.
      features: A, (B,H,W,C).
      target: see ``Target``; a callable sees the (stop-gradient) logits of this very forward pass.
      has_aux: forward ``head_fn``'s auxiliary output (e.g. updated BatchNorm statistics).

    Returns:
      ``(alpha, logits)`` or ``(alpha, logits, aux)``. The forward pass runs once; its dropout mask is the one the
      gradient sees, as in the paper's PyTorch code.
    """
    if has_aux:
        logits, vjp_fn, aux = jax.vjp(head_fn, features, has_aux=True)
    else:
        logits, vjp_fn = jax.vjp(head_fn, features)
    alpha = sensitivities_from_vjp(lambda cotangent: vjp_fn(cotangent)[0], logits, target)
    return (alpha, logits, aux) if has_aux else (alpha, logits)


def sensitivities_from_vjp(vjp_fn: Callable[[jax.Array], jax.Array], logits: jax.Array, target: Target) -> jax.Array:
    """Channel sensitivities alpha (B,C) from ``vjp_fn`` (cotangent (B,K) -> d(cotangent . logits)/dA (B,H,W,C),
    e.g. a split model's ``linearize(...).vjp``) and the logits (B,K) it belongs to."""
    return jnp.sum(vjp_fn(target_weights(target, logits)), axis=(1, 2))


def weighted_collapse(features: jax.Array, alpha: jax.Array, *, relu: bool = True) -> jax.Array:
    """Collapses A (B,H,W,C) over channels with weights alpha (B,C) -> (B,H,W), then ReLU."""
    maps = jnp.einsum("bhwc,bc->bhw", features, alpha)
    return jax.nn.relu(maps) if relu else maps


def grad_cam(head_fn: HeadFn, features: jax.Array, target: Target, *, relu: bool = True) -> jax.Array:
    """Grad-CAM / weighted collapsed attribution at the layer that produced ``features``.

    Args:
      head_fn: A (B,H,W,C) -> logits (B,K).
      features: A, (B,H,W,C).
      target: (B,) int classes, (B,K) logit weights, or a callable of the logits (see ``Target``).
      relu: apply the final ReLU (the paper does).

    Returns:
      (B,H,W) maps, differentiable w.r.t. ``features`` and anything ``head_fn`` closes over.
    """
    alpha, _ = sensitivities_and_logits(head_fn, features, target)
    return weighted_collapse(features, alpha, relu=relu)


def grad_cam_all_classes(head_fn: HeadFn, features: jax.Array, *,
                         relu: bool = True) -> tuple[jax.Array, jax.Array]:
    """Grad-CAM for every class at once: one forward pass, ``jax.vmap`` over the K one-hot cotangents.

    Returns:
      ``(maps, logits)``: maps (B,K,H,W), logits (B,K).
    """
    logits, vjp_fn = jax.vjp(head_fn, features)
    return grad_cam_all_classes_from_vjp(lambda cotangent: vjp_fn(cotangent)[0], features, logits, relu=relu), logits


def grad_cam_all_classes_from_vjp(vjp_fn: Callable[[jax.Array], jax.Array], features: jax.Array, logits: jax.Array,
                                  *, relu: bool = True) -> jax.Array:
    """Grad-CAM maps (B,K,H,W) of every class from ``vjp_fn`` (cotangent (B,K) -> d(cotangent . logits)/dA
    (B,H,W,C), e.g. a split model's ``linearize(...).vjp``), the features A (B,H,W,C) and the logits (B,K)."""
    batch, num_classes = logits.shape
    one_hots = jnp.broadcast_to(jnp.eye(num_classes, dtype=logits.dtype)[:, None, :],
                                (num_classes, batch, num_classes))
    grads = jax.vmap(vjp_fn)(one_hots)  # (K,B,H,W,C)
    alpha = jnp.sum(grads, axis=(2, 3))  # (K,B,C)
    maps = jnp.einsum("bhwc,kbc->bkhw", features, alpha)
    return jax.nn.relu(maps) if relu else maps


def activation_collapse(features: jax.Array) -> jax.Array:
    """The paper's unweighted collapsed map ('ewa', attention transfer with p=2): mean_c A^2, (B,H,W,C) -> (B,H,W)."""
    return jnp.mean(jnp.square(features), axis=-1)


def resize_maps(maps: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear resize of maps (..., H, W) to (..., size, size) (half-pixel centres, as cv2 upsampling)."""
    height_width = (size, size) if isinstance(size, int) else tuple(size)
    return jax.image.resize(maps, maps.shape[:-2] + height_width, method="bilinear")


def minmax_normalize(maps: jax.Array, eps: float = 1e-5) -> jax.Array:
    """(map - min) / (max - min + eps) per map over the last two axes (docs/method.md#localisation-metrics)."""
    low = jnp.min(maps, axis=(-2, -1), keepdims=True)
    high = jnp.max(maps, axis=(-2, -1), keepdims=True)
    return (maps - low) / (high - low + eps)
