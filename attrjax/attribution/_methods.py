"""Every attribution method by name, for every class of a batch at once: the evaluation's entry point.

``class_maps(model, variables, images, method, layer=...)`` returns raw maps (B,K,h,w), one per image and class,
with the paper's per-method conventions:

| method | map |
|---|---|
| ``gradcam`` | Grad-CAM at ``layer`` (ReLU of the sensitivity-weighted channel sum); all classes from one vjp |
| ``ebp`` | Excitation Backprop's marginal winning probability at ``layer``, clamped at 0 |
| ``lrp`` | LRP alpha1-beta0, z^B at the input conv (each image's min/max as bounds), read at the input |
| ``rap`` | RAP at the input, positive relevance only |
| ``attnlrp`` | LRP, ``"attnlrp"`` composite (LayerNorm held, softmax rule, uniform products), at the input |
| ``cp_lrp`` | LRP with the ``"cp_lrp"`` composite (attention probabilities held constant), at the input |
| ``rollout`` | attention rollout over the patch grid (transformers; the same map for every class) |
| ``gradient_rollout`` | gradient-weighted attention rollout over the patch grid (transformers) |
| ``saliency`` | max over colour channels of abs(gradient) |
| ``input_x_gradient`` | colour-channel sum of x * gradient |
| ``integrated_gradients`` | colour-channel sum of integrated gradients from the zero (mean-colour) image |
| ``smooth_grad`` | max over colour channels of abs(SmoothGrad's mean gradient) |
| ``guided_backprop`` | max over colour channels of abs(guided gradient) |

Maps live at the resolution of the layer they are read at (``gradcam``/``ebp``), of the patch grid (the rollouts)
or of the image (the others);
evaluation resizes them to the image and min-max normalises them. Methods other than Grad-CAM attribute one class
per pass: classes go in groups of ``class_chunk`` (vmapped inside a group, groups one after another with
``attrjax._chunking.chunked_map``), so memory is bounded by class_chunk x B images' activations while the forward
pass, which does not depend on the class, is shared within a group.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from attrjax.attribution._attention import attention_rollout, gradient_rollout
from attrjax.attribution._gradcam import grad_cam_all_classes_from_vjp
from attrjax.attribution._gradients import (guided_backprop, input_x_gradient, integrated_gradients, saliency,
                                           smooth_grad, sum_channels)
from attrjax.attribution._propagation import excitation_backprop, lrp
from attrjax.attribution._rap import rap
from attrjax._chunking import chunked_map
from attrjax.models import ModelLike, as_split_model, logits_fn

# (model, variables, images (B,S,S,3), classes (B,) int, layer, **options) -> maps (B,h,w), one class per image.
ClassMapFn = Callable[..., jax.Array]
_SMOOTH_GRAD_KEY = 0  # SmoothGrad's noise is a fixed function of the method, so evaluations are reproducible.


def _max_abs_channel(gradients: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(gradients), axis=-1)


def _ebp(model, variables, images, classes, layer, **options):
    return jnp.maximum(excitation_backprop(model, variables, images, classes, layer=layer, **options), 0.0)


def _lrp(model, variables, images, classes, layer, **options):
    return lrp(model, variables, images, classes, **options)


def _rap(model, variables, images, classes, layer, **options):
    return rap(model, variables, images, classes, **options)


def _gradient_rollout(model, variables, images, classes, layer, **options):
    return gradient_rollout(model, variables, images, classes, **options)


def _saliency(model, variables, images, classes, layer, **options):
    return saliency(logits_fn(model, variables), images, classes, **options)


def _input_x_gradient(model, variables, images, classes, layer, **options):
    return input_x_gradient(logits_fn(model, variables), images, classes, **options)


def _integrated_gradients(model, variables, images, classes, layer, **options):
    return sum_channels(integrated_gradients(logits_fn(model, variables), images, classes, **options))


def _smooth_grad(model, variables, images, classes, layer, **options):
    key = jax.random.key(_SMOOTH_GRAD_KEY)
    return _max_abs_channel(smooth_grad(logits_fn(model, variables), images, classes, rng=key, **options))


def _guided_backprop(model, variables, images, classes, layer, **options):
    return _max_abs_channel(guided_backprop(model, variables, images, classes, **options))


PER_CLASS_METHODS: dict[str, ClassMapFn] = {
    "ebp": _ebp,
    "lrp": _lrp,
    "rap": _rap,
    "attnlrp": functools.partial(_lrp, composite="attnlrp"),
    "cp_lrp": functools.partial(_lrp, composite="cp_lrp"),
    "gradient_rollout": _gradient_rollout,
    "saliency": _saliency,
    "input_x_gradient": _input_x_gradient,
    "integrated_gradients": _integrated_gradients,
    "smooth_grad": _smooth_grad,
    "guided_backprop": _guided_backprop,
}
METHODS = ("gradcam", "rollout") + tuple(PER_CLASS_METHODS)
"""Every method ``class_maps`` computes, by name."""
ATTENTION_METHODS = ("rollout", "gradient_rollout")
"""The methods that read a transformer's attention (the others work on any model)."""
PAPER_METHODS = ("gradcam", "lrp", "rap", "ebp")
"""The four methods the original evaluation scores."""


LAYER_METHODS = ("gradcam", "ebp")
"""The methods that read their maps at a layer (``layer=`` is required for them)."""


def check_method(method: str, layer: str | None = "") -> None:
    """Raises, naming the available methods, unless ``method`` is one of ``METHODS``; and, when ``layer`` is None,
    unless the method needs no layer."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; available: {', '.join(METHODS)}")
    if method in LAYER_METHODS and layer is None:
        raise ValueError(f"method {method!r} reads its map at a layer; pass layer= (e.g. the last conv, or a "
                         "transformer block)")


def resolve_methods(spec: str) -> tuple[str, ...]:
    """Method names from ``"all"`` (every method that works on any model: all but ``ATTENTION_METHODS``),
    ``"paper"`` (Grad-CAM, LRP, RAP, EBP) or comma-separated names, each checked."""
    if spec == "all":
        return tuple(method for method in METHODS if method not in ATTENTION_METHODS)
    if spec == "paper":
        return PAPER_METHODS
    methods = tuple(name.strip() for name in spec.split(","))
    for method in methods:
        check_method(method)
    return methods


def class_maps(model: ModelLike, variables: dict, images: jax.Array, method: str = "gradcam", *,
               layer: str | None = None, class_chunk: int = 8, **options: Any) -> tuple[jax.Array, jax.Array]:
    """Raw maps of every class for a batch: ``(maps (B,K,h,w), logits (B,K))``.

    Args:
      model: anything ``attrjax.models.as_split_model`` takes (attrjax's VGG and ResNets, a Flax linen or NNX
        classifier, a split model), applied in eval mode.
      variables: its variables.
      images: (B,S,S,3) normalised images.
      method: one of ``METHODS`` (see the module docstring).
      layer: where ``gradcam`` and ``ebp`` read their maps (required for them; the other methods attribute the
        input or, the rollouts, the patch grid).
      class_chunk: classes attributed together by the per-class methods (memory vs speed).
      **options: keyword arguments of the method's function (e.g. ``steps=16`` for integrated gradients,
        ``samples=8`` for SmoothGrad, ``composite="epsilon_plus"`` for LRP); Grad-CAM takes none.
    """
    check_method(method, layer)
    if class_chunk < 1:
        raise ValueError(f"class_chunk must be >= 1, got {class_chunk}")
    if method == "gradcam":
        if options:
            raise ValueError(f"gradcam takes no options, got {sorted(options)}")
        assert layer is not None  # checked above
        lin = as_split_model(model, images).linearize(variables, images, layer)
        return grad_cam_all_classes_from_vjp(lin.vjp, lin.activations, lin.logits), lin.logits
    logits = logits_fn(model, variables)(images)
    if method == "rollout":  # class-independent: one map, repeated for every class
        maps = attention_rollout(model, variables, images, **options)
        return jnp.broadcast_to(maps[:, None], (maps.shape[0], logits.shape[1], *maps.shape[1:])), logits
    batch, num_classes = logits.shape
    one_class = functools.partial(PER_CLASS_METHODS[method], model, variables, images, layer=layer, **options)
    per_class = chunked_map(lambda k: one_class(jnp.full((batch,), k)), jnp.arange(num_classes), class_chunk)
    return jnp.moveaxis(per_class, 0, 1), logits
