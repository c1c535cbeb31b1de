"""Deletion/insertion curves against a linear oracle and a brute-force NumPy loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.attribution import top1_target
from attrjax.metrics import curve_auc, deletion_curve, insertion_curve

SIZE, CHANNELS = 5, 2  # 25 pixels: with steps=4 the counts 0, 6, 12, 18, 25 are not all multiples of 25/4


def _linear_problem(seed=0, batch=3):
    """Integer images and weights, so every logit is an exact float32 sum whatever the evaluation order."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 4, (batch, SIZE, SIZE, CHANNELS)).astype(np.float32)
    weights = rng.integers(-3, 4, (2, SIZE, SIZE, CHANNELS)).astype(np.float32)

    def logit_fn(x):
        return jnp.einsum("bhwc,khwc->bk", x, weights)

    # The oracle: each pixel's exact contribution to logit 0 relative to the zero baseline.
    oracle = np.einsum("bhwc,hwc->bhw", images, weights[0])
    return logit_fn, images, oracle


def _mlp_problem(seed=1, batch=2, classes=3):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, SIZE, SIZE, CHANNELS)).astype(np.float32)
    hidden = jnp.asarray(rng.normal(size=(SIZE * SIZE * CHANNELS, 8)).astype(np.float32))
    out = jnp.asarray(rng.normal(size=(8, classes)).astype(np.float32))

    def logit_fn(x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ hidden) @ out

    maps = np.round(rng.normal(size=(batch, SIZE, SIZE)), 0).astype(np.float32)  # many ties
    maps[0, 0, 0] = -0.0  # ties with +0
    return logit_fn, images, maps


def _brute_force(logit_fn, images, maps, target, steps, baseline, insert, score):
    """Sorts each map's pixels (stable, descending: row-major among ties), perturbs the top n, evaluates."""
    batch = images.shape[0]
    num_pixels = SIZE * SIZE
    baseline = np.broadcast_to(baseline, images.shape)
    curves = np.zeros((batch, steps + 1))
    for b in range(batch):
        order = np.argsort(-maps[b].ravel(), kind="stable")
        for i in range(steps + 1):
            n = i * num_pixels // steps
            chosen = np.zeros(num_pixels, bool)
            chosen[order[:n]] = True
            chosen = chosen.reshape(SIZE, SIZE, 1)
            x = np.where(chosen, images[b], baseline[b]) if insert else np.where(chosen, baseline[b], images[b])
            logits = np.asarray(logit_fn(jnp.asarray(x[None])), np.float64)[0]
            scores = {"logit": logits, "sigmoid": 1 / (1 + np.exp(-logits)),
                      "softmax": np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()}[score]
            curves[b, i] = scores[target[b]]
    return curves


def test_oracle_map_deletes_fastest_and_inserts_fastest():
    logit_fn, images, oracle = _linear_problem()
    target = np.zeros(3, int)
    random_map = np.random.default_rng(5).normal(size=oracle.shape)
    kwargs = dict(steps=5, score="logit")
    deletion = {name: curve_auc(deletion_curve(logit_fn, images, m, target, **kwargs))
                for name, m in [("oracle", oracle), ("random", random_map), ("inverted", -oracle)]}
    insertion = {name: curve_auc(insertion_curve(logit_fn, images, m, target, **kwargs))
                 for name, m in [("oracle", oracle), ("random", random_map), ("inverted", -oracle)]}
    assert np.all(deletion["oracle"] < deletion["random"]) and np.all(deletion["oracle"] < deletion["inverted"])
    assert np.all(insertion["oracle"] > insertion["random"]) and np.all(insertion["oracle"] > insertion["inverted"])
    # Pointwise too: removing the n largest contributions lowers a linear logit the most.
    oracle_curve = np.asarray(deletion_curve(logit_fn, images, oracle, target, **kwargs))
    random_curve = np.asarray(deletion_curve(logit_fn, images, random_map, target, **kwargs))
    assert np.all(oracle_curve <= random_curve)


@pytest.mark.parametrize("score", ["logit", "sigmoid"])
def test_curve_endpoints_are_the_intact_and_baseline_scores_exactly(score):
    logit_fn, images, oracle = _linear_problem()
    target = np.array([0, 1, 0])
    baseline = np.float32(2.0)
    score_fn = {"logit": lambda z: z, "sigmoid": jax.nn.sigmoid}[score]
    intact = np.asarray(score_fn(logit_fn(images)))[np.arange(3), target]
    blank = np.asarray(score_fn(logit_fn(np.full_like(images, baseline))))[np.arange(3), target]
    deletion = np.asarray(deletion_curve(logit_fn, images, oracle, target, steps=3, baseline=baseline, score=score))
    insertion = np.asarray(insertion_curve(logit_fn, images, oracle, target, steps=3, baseline=baseline,
                                           score=score))
    chex.assert_shape(deletion, (3, 4))
    np.testing.assert_array_equal(deletion[:, 0], intact)
    np.testing.assert_array_equal(deletion[:, -1], blank)
    np.testing.assert_array_equal(insertion[:, 0], blank)
    np.testing.assert_array_equal(insertion[:, -1], intact)


@pytest.mark.parametrize("insert,score", [(False, "sigmoid"), (True, "softmax"), (False, "logit")])
def test_curves_match_a_brute_force_loop_with_ties(insert, score):
    logit_fn, images, maps = _mlp_problem()
    target = np.array([2, 0])
    baseline = np.linspace(-1, 1, CHANNELS, dtype=np.float32)  # per-channel, broadcast to the images
    curve_fn = insertion_curve if insert else deletion_curve
    curve = curve_fn(logit_fn, images, maps, target, steps=4, baseline=baseline, score=score)
    expected = _brute_force(logit_fn, images, maps, target, 4, baseline, insert, score)
    np.testing.assert_allclose(curve, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("insert", [False, True])
def test_a_map_with_a_nan_pixel_has_no_curve(insert):
    """NaN orders no pixel, so the curve of a map holding one is NaN, not the curve of an arbitrary order;
    +-inf pixels are ordering values (first / last), like large finite stand-ins."""
    logit_fn, images, maps = _mlp_problem(batch=4)
    maps[0, 2, 3] = np.nan
    maps[1] = np.nan
    maps[2, 0, 1], maps[2, 4, 4] = np.inf, -np.inf
    target = np.array([2, 0, 1, 1])
    curve_fn = insertion_curve if insert else deletion_curve
    curve = np.asarray(curve_fn(logit_fn, images, maps, target, steps=4))
    assert np.isnan(curve[:2]).all()
    stand_ins = np.where(np.isinf(maps[2:]), np.sign(maps[2:]) * 1e30, maps[2:]).astype(np.float32)
    expected = _brute_force(logit_fn, images[2:], stand_ins, target[2:], 4, 0.0, insert, "sigmoid")
    np.testing.assert_allclose(curve[2:], expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(curve_auc(curve)[:2]).all()


def test_chunked_equals_unchunked_and_jit_equals_eager():
    logit_fn, images, maps = _mlp_problem()
    target = np.array([1, 2])
    whole = deletion_curve(logit_fn, images, maps, target, steps=4)
    # 10 curve images in chunks of 3: the last chunk is padded.
    chunked = deletion_curve(logit_fn, images, maps, target, steps=4, chunk_size=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    jitted = jax.jit(lambda x, m, t: insertion_curve(logit_fn, x, m, t, steps=4, chunk_size=4))
    np.testing.assert_allclose(jitted(images, maps, target),
                               insertion_curve(logit_fn, images, maps, target, steps=4, chunk_size=4),
                               rtol=1e-6, atol=1e-7)


def test_weight_and_callable_targets():
    logit_fn, images, maps = _mlp_problem()
    by_class = deletion_curve(logit_fn, images, maps, np.array([1, 1]), steps=2, score="softmax")
    by_weights = deletion_curve(logit_fn, images, maps, np.array([[0.0, 1.0, 0.0]] * 2), steps=2, score="softmax")
    np.testing.assert_allclose(by_weights, by_class, rtol=1e-6)
    top1 = np.asarray(jnp.argmax(logit_fn(images), -1))
    np.testing.assert_allclose(deletion_curve(logit_fn, images, maps, top1_target, steps=2),
                               deletion_curve(logit_fn, images, maps, top1, steps=2), rtol=1e-6)


def test_curve_auc_is_the_trapezoid_rule():
    curve = jnp.array([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(curve_auc(curve), [0.5, 0.25])
    np.testing.assert_allclose(curve_auc(curve), np.trapezoid(np.asarray(curve), dx=0.5, axis=-1))


def test_bad_inputs_are_rejected():
    logit_fn, images, maps = _mlp_problem()
    target = np.array([0, 1])
    with pytest.raises(ValueError, match="maps must have shape"):
        deletion_curve(logit_fn, images, maps[:, :4], target)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        deletion_curve(logit_fn, images, maps, target, steps=0)
    with pytest.raises(ValueError, match="chunk_size"):
        insertion_curve(logit_fn, images, maps, target, chunk_size=0)
    with pytest.raises(ValueError, match="score must be one of"):
        deletion_curve(logit_fn, images, maps, target, score="prob")
    with pytest.raises(ValueError, match="does not broadcast"):
        deletion_curve(logit_fn, images, maps, target, baseline=np.zeros(3))
    with pytest.raises(ValueError, match="target classes must lie"):
        deletion_curve(logit_fn, images, maps, np.array([0, 3]))
    with pytest.raises(ValueError, match="P >= 2"):
        curve_auc(jnp.zeros((2, 1)))
