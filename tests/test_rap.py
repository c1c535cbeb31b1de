"""RAP on a tiny VGG against a separate float64 NumPy implementation of its equations, and its properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.attribution._rap import rap
from attrjax.models import init_variables
from tests.test_propagation import _col2im, _im2col, _images, _max_pool_relevance, _model, _numpy_trunk, _variables


def _safe(a, b):
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


# ---------------------------------------------------------------------------------------------------------------
# Independent float64 NumPy RAP: explicit contribution matrices per output, explicit im2col and arg-max loops.


def _first_prop(v, weights, bias, t):
    """v (D,) classifier input, weights (D,K), bias (K,), t (K,) target weights -> (D,)."""
    c = v[:, None] * weights
    pos_x = np.maximum(v, 0)[:, None]
    c_pp, c_pn = pos_x * np.maximum(weights, 0), pos_x * np.minimum(weights, 0)
    total_pos, total_neg = (t * np.maximum(c, 0).sum(0)).sum(), (t * np.minimum(c, 0).sum(0)).sum()
    share_pos, share_neg = _safe(total_pos, total_pos + total_neg), _safe(total_neg, total_pos + total_neg)
    out = (c * t).sum(1)
    out = out + (_safe(c_pp, c_pp.sum(0)) * t * bias * share_pos).sum(1)
    out = out + (_safe(c_pn, c_pn.sum(0)) * t * bias * share_neg).sum(1)
    return np.abs(out) * _safe(out.sum(), np.abs(out).sum())


def _hidden(cols, kernel, relevance):
    """One output position: cols (n,) >= 0, kernel (n,m), relevance (m,) -> (n,) before the shift."""
    c = cols[:, None] * kernel
    exc, inh = np.maximum(c, 0), -np.minimum(c, 0)
    p, n = exc.sum(0), inh.sum(0)
    r_pos, r_neg = np.maximum(relevance, 0), np.minimum(relevance, 0)
    return (exc * _safe(r_pos, p) + inh * (_safe(relevance, p + n) + _safe(r_neg, n))).sum(1)


def _zb(cols, kernel, relevance, low, high):
    c = cols[:, None] * kernel - low[:, None] * np.maximum(kernel, 0) - high[:, None] * np.minimum(kernel, 0)
    return (c * _safe(relevance, c.sum(0))).sum(1)


def _reference(model, variables, image, t, layer="input", bounds=None):
    """Signed RAP map of one image (H,W,3), float64; t: (K,) target weights."""
    low, high = (float(np.min(image)), float(np.max(image))) if bounds is None else bounds
    params, x, tape = _numpy_trunk(model, variables, image)
    weights, bias = params["classifier"]["kernel"], params["classifier"]["bias"]
    h, w, c = x.shape
    if model.head_pooling == "avg":
        pooled = x.mean(axis=(0, 1))
        r_pooled = _first_prop(pooled, weights, bias, t)
        relevance = x / (h * w) * _safe(r_pooled, pooled)  # proportional through the average
    else:
        relevance = _first_prop(x.transpose(2, 0, 1).reshape(-1), weights, bias, t).reshape(c, h, w)
        relevance = relevance.transpose(1, 2, 0)
    for kind, name, inp, extra in reversed(tape):
        if name == layer:  # a conv's relu entry comes first: its relevance is read at the ReLU output
            break
        if kind == "relu":
            continue
        if kind == "pool":
            relevance = _max_pool_relevance(inp, relevance)
            continue
        kernel = extra[0]
        cols = _im2col(inp)
        first = name == model.layers[1]
        r_cols = np.stack([np.stack([
            _zb(cols[i, j], kernel, relevance[i, j], _im2col(np.full(inp.shape, low))[i, j],
                _im2col(np.full(inp.shape, high))[i, j]) if first else _hidden(cols[i, j], kernel, relevance[i, j])
            for j in range(inp.shape[1])]) for i in range(inp.shape[0])])
        r_in = _col2im(r_cols, inp.shape)
        if not first:  # the shift: the excess leaves the non-zero units evenly
            nonzero = r_in != 0
            r_in = r_in - nonzero * (r_in.sum() - relevance.sum()) / max(nonzero.sum(), 1)
        relevance = r_in
    return relevance.sum(-1)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_pooling", ["flatten", "avg"])
def test_matches_numpy_reference(head_pooling):
    model = _model(head_pooling)
    variables, images, target = _variables(model), _images(), np.array([1, 2])
    for layer, kwargs, ref_kwargs in (("input", {}, {}), ("conv2_1", {}, {}), ("pool1", {}, {}),
                                      ("input", {"input_bounds": (-4.5, 4.5)}, {"bounds": (-4.5, 4.5)})):
        maps = rap(model, variables, images, target, layer=layer, positive_only=False, **kwargs)
        for b in range(2):
            expected = _reference(model, variables, images[b], np.eye(3)[target[b]], layer, **ref_kwargs)
            scale = np.abs(expected).max()
            np.testing.assert_allclose(maps[b], expected, rtol=1e-3, atol=1e-4 * scale, err_msg=f"{layer} {b}")
        np.testing.assert_array_equal(rap(model, variables, images, target, layer=layer, **kwargs),
                                      np.maximum(maps, 0.0))


@pytest.mark.parametrize("head_pooling", ["flatten", "avg"])
def test_net_relevance_is_conserved_at_every_layer(head_pooling):
    model = _model(head_pooling)
    variables, images = _variables(model, seed=3), _images(seed=4)
    logits = np.asarray(model.apply(variables, images))
    weights = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 2.0]])
    score = (weights * logits).sum(1)
    for layer in ("input",) + model.layers[1:]:
        maps = rap(model, variables, images, jnp.asarray(weights), layer=layer, positive_only=False)
        relevant, irrelevant = np.maximum(maps, 0).sum((1, 2)), np.minimum(maps, 0).sum((1, 2))
        np.testing.assert_allclose(relevant + irrelevant, score, rtol=1e-4, atol=1e-6, err_msg=layer)
    # The shift makes relevance bi-polar although first_prop gives every unit the score's sign (on this data: the
    # units below conv2_1's shift end up with the opposite sign, read at conv1_1 where channels do not overlap much).
    maps = rap(model, variables, images, jnp.asarray(weights), layer="conv1_1", positive_only=False)
    assert (np.sign(maps) == -np.sign(score)[:, None, None]).any(axis=(1, 2)).all()


def test_jit_batched_and_target_forms_agree():
    model = _model("flatten")
    variables, images, target = _variables(model), _images(batch=3), jnp.array([2, 0, 1])
    eager = rap(model, variables, images, target, positive_only=False)
    chex.assert_shape(eager, (3, 8, 8))
    jitted = jax.jit(functools.partial(rap, model, positive_only=False))(variables, images, target)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
    for b in range(3):
        single = rap(model, variables, images[b:b + 1], target[b:b + 1], positive_only=False)
        chex.assert_trees_all_close(single[0], eager[b], rtol=1e-5, atol=1e-6)
    one_hot = jax.nn.one_hot(target, 3)
    chex.assert_trees_all_close(rap(model, variables, images, one_hot, positive_only=False), eager)
    chex.assert_trees_all_close(rap(model, variables, images, lambda logits: target, positive_only=False), eager)


def _region_network(model):
    """Class 0 sees only channel 0 of the image's top-left 4x4 quadrant, through a strong path; the rest is weak."""
    variables = jax.tree.map(np.asarray, init_variables(model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = {name: dict(leaf) for name, leaf in variables["params"].items()}
    for name in ("conv1_1", "conv2_1"):
        kernel = 0.01 * rng.normal(size=params[name]["kernel"].shape)
        kernel[1, 1, 0, 0] = 1.0  # centre tap: channel 0 -> channel 0
        params[name] = {"kernel": kernel, "bias": np.zeros_like(params[name]["bias"])}
    classifier = 0.01 * rng.normal(size=params["classifier"]["kernel"].shape)
    classifier[0, 0] = 1.0  # C,H,W flatten: feature 0 is channel 0 at the top-left cell of the 2x2 map
    params["classifier"] = {"kernel": classifier, "bias": np.zeros(3)}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                        {"params": params, "batch_stats": variables["batch_stats"]})


def test_positive_mass_concentrates_on_the_driving_region():
    model = _model("flatten")
    variables = _region_network(model)
    images = 0.1 * _images(batch=2, seed=5)
    images = images.at[:, :4, :4, 0].add(3.0)  # the evidence for class 0
    maps = np.asarray(rap(model, variables, images, jnp.array([0, 0])))
    inside = maps[:, :4, :4].sum((1, 2))
    assert (inside / maps.sum((1, 2)) > 0.95).all(), inside / maps.sum((1, 2))


def test_bad_inputs_raise():
    model = _model("flatten")
    variables, images = _variables(model), _images()
    with pytest.raises(ValueError, match="unknown layer"):
        rap(model, variables, images, jnp.array([0, 1]), layer="fc7")
    with pytest.raises(ValueError, match="NHWC"):
        rap(model, variables, jnp.transpose(images, (0, 3, 1, 2)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        rap(model, variables, images, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="classes"):
        rap(model, variables, images, np.array([0, 3]))
