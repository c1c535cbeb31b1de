"""Every method of the evaluation registry, all classes at once, against one class at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax.attribution import (excitation_backprop, grad_cam, guided_backprop, input_x_gradient,
                                 integrated_gradients, lrp, rap, saliency, smooth_grad)
from attrjax.attribution._methods import class_maps, resolve_methods
from attrjax._evaluation import localization_report
from attrjax.models import VGG, init_variables, vgg

LAYER = "conv2_1"


@pytest.fixture(scope="module")
def tiny():
    model = vgg(((4,), (8,)), num_classes=3, image_size=8, head_pooling="avg")
    variables = init_variables(model, jax.random.key(0))
    images = draws.normal(jax.random.key(1), (2, 8, 8, 3))
    return model, variables, images


def one_class_map(method, model, variables, images, classes):
    """The single-class primitive behind each method, with the registry's documented reduction."""
    logit_fn = lambda x: model.apply(variables, x)  # noqa: E731
    if method == "gradcam":
        feats = model.apply(variables, images, layer=LAYER, method=VGG.features)
        return grad_cam(lambda a: model.apply(variables, a, layer=LAYER, method=VGG.head), feats, classes)
    if method == "ebp":
        return jnp.maximum(excitation_backprop(model, variables, images, classes, layer=LAYER), 0)
    if method == "lrp":
        return lrp(model, variables, images, classes)
    if method == "rap":
        return rap(model, variables, images, classes)
    if method in ("attnlrp", "cp_lrp"):  # on a CNN: the epsilon rule everywhere
        return lrp(model, variables, images, classes, composite=method)
    if method == "saliency":
        return saliency(logit_fn, images, classes)
    if method == "input_x_gradient":
        return input_x_gradient(logit_fn, images, classes)
    if method == "integrated_gradients":
        return integrated_gradients(logit_fn, images, classes).sum(-1)
    if method == "smooth_grad":
        return jnp.abs(smooth_grad(logit_fn, images, classes, rng=jax.random.key(0))).max(-1)
    if method == "guided_backprop":
        return jnp.abs(guided_backprop(model, variables, images, classes)).max(-1)
    raise AssertionError(method)


@pytest.mark.parametrize("method", resolve_methods("all"))
def test_all_classes_equal_one_class_at_a_time(tiny, method):
    model, variables, images = tiny
    maps, logits = jax.jit(lambda v, x: class_maps(model, v, x, method, layer=LAYER, class_chunk=2))(variables, images)
    np.testing.assert_allclose(logits, model.apply(variables, images), rtol=1e-5, atol=1e-6)
    assert maps.shape[:2] == (2, 3)
    for k in range(3):
        expected = one_class_map(method, model, variables, images, jnp.full((2,), k))
        np.testing.assert_allclose(maps[:, k], expected, rtol=2e-4, atol=1e-5)


def test_localization_report_runs_any_method(tiny):
    model, variables, images = tiny
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 1
    batch = {"image": np.asarray(images), "mask": masks, "valid": np.ones(2, bool)}
    summary, teacher = localization_report(model, variables, [batch], layer=LAYER, method="lrp",
                                           reference=(model, variables), keep_raw_maps=True,
                                           prediction_rule="positive_logit")
    np.testing.assert_allclose(summary["map_cosine"], 1.0, rtol=1e-5)
    # A student compared with the teacher's cached raw maps scores as when the teacher is recomputed.
    student = init_variables(model, jax.random.key(7))
    recomputed, _ = localization_report(model, student, [batch], layer=LAYER, method="lrp",
                                        reference=(model, variables), prediction_rule="positive_logit")
    cached, _ = localization_report(model, student, [batch], layer=LAYER, method="lrp",
                                    reference=teacher["raw_maps"], prediction_rule="positive_logit")
    assert recomputed["map_cosine"] < 0.99
    np.testing.assert_allclose(cached["map_cosine"], recomputed["map_cosine"], rtol=1e-6)
    assert cached["same_peak"] == recomputed["same_peak"]


def test_bad_method_or_missing_layer_is_a_clear_error(tiny):
    model, variables, images = tiny
    with pytest.raises(ValueError, match="unknown attribution method 'gradcm'; available: gradcam"):
        class_maps(model, variables, images, "gradcm", layer=LAYER)
    with pytest.raises(ValueError, match="pass layer="):
        class_maps(model, variables, images, "ebp")
