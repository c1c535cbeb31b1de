"""LRP and Excitation Backprop on a tiny VGG against a brute-force float64 NumPy reference, today's recorded outputs and
their identities."""

import pathlib

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax.attribution import (AlphaBeta, Composite, Epsilon, ZBox, excitation_backprop, lrp, propagation_graph,
                                 propagation_maps, rap)
from attrjax.attribution._graph import Affine
from attrjax.models import init_variables, vgg
from attrjax.models._vgg import max_pool_2x2

BN_EPS = 1e-5


def _model(head_pooling):
    return vgg(((4,), (8,)), num_classes=3, image_size=8, head_pooling=head_pooling)


def _variables(model, seed=0, bias_free=False):
    """Initial params with random BatchNorm scale/shift/statistics so the folding is not trivial."""
    variables = jax.tree.map(np.asarray, init_variables(model, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    for name in [n for n in params if n.startswith("bn")]:
        width = params[name]["scale"].shape[0]
        shift = np.zeros(width) if bias_free else rng.normal(0, 0.1, width)
        mean = np.zeros(width) if bias_free else rng.normal(0, 0.1, width)
        params[name] = {"scale": rng.uniform(0.5, 1.5, width), "bias": shift}
        stats[name] = {"mean": mean, "var": rng.uniform(0.5, 1.5, width)}
    if bias_free:
        params = {name: {**leaf, "bias": np.zeros_like(leaf["bias"])} if "kernel" in leaf else leaf
                  for name, leaf in params.items()}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), {"params": params, "batch_stats": stats})


def _images(batch=2, seed=1):
    return draws.normal(jax.random.PRNGKey(seed), (batch, 8, 8, 3))


# ---------------------------------------------------------------------------------------------------------------
# Independent float64 NumPy reference: explicit im2col, explicit per-output contribution matrices, explicit argmax.


def _im2col(x):
    """(H,W,C) -> (H,W,9C) patches of a 3x3 conv with padding 1, in (kh, kw, cin) order (HWIO kernel rows)."""
    height, width, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    return np.stack([np.stack([padded[h:h + 3, w:w + 3].reshape(-1) for w in range(width)]) for h in range(height)])


def _col2im(cols, shape):
    height, width, channels = shape
    padded = np.zeros((height + 2, width + 2, channels))
    for h in range(height):
        for w in range(width):
            padded[h:h + 3, w:w + 3] += cols[h, w].reshape(3, 3, channels)
    return padded[1:-1, 1:-1]


def _dense_relevance(x, weights, bias, relevance, rule, low=None, high=None, epsilon=0.0):
    """Explicit LRP of z = x W + b for one vector x (n,), W (n,m), relevance (m,)."""
    contributions = x[:, None] * weights  # z_ij
    if rule == "epsilon":
        z = contributions.sum(0) + bias
        return (contributions / (z + epsilon * np.where(z >= 0, 1.0, -1.0)) * relevance).sum(1)
    if rule == "zb":
        contributions = contributions - low[:, None] * np.maximum(weights, 0) - high[:, None] * np.minimum(weights, 0)
        z = contributions.sum(0)
        return (np.divide(contributions, z, out=np.zeros_like(contributions), where=z != 0) * relevance).sum(1)
    alpha, beta = rule
    out = np.zeros_like(x)
    has_negative = (contributions < 0).any(0)  # outputs without inhibition give all relevance to excitation
    for coef, sign in ((np.where(has_negative, alpha, 1.0), 1.0), (np.where(has_negative, -beta, 0.0), -1.0)):
        part = np.where(sign * contributions > 0, contributions, 0.0)
        z = part.sum(0)
        out = out + (np.divide(part, z, out=np.zeros_like(part), where=z != 0) * coef * relevance).sum(1)
    return out


def _numpy_trunk(model, variables, image):
    """The conv trunk of one image (H,W,3) in float64, BatchNorm folded: ``(params, output (h,w,c), tape)``.

    Tape entries ``(kind, layer name, input, extra)`` in forward order: ``("conv", name, input, (kernel (9*Cin,
    Cout), bias))`` followed by ``("relu", name, output, None)``, or ``("pool", name, input, None)``.
    """
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    x = np.asarray(image, np.float64)
    tape = []
    for name in model.layers[1:]:
        if name.startswith("pool"):
            tape.append(("pool", name, x, None))
            height, width, channels = x.shape
            x = x.reshape(height // 2, 2, width // 2, 2, channels).max(axis=(1, 3))
            continue
        bn_params, bn_stats = params["bn" + name[4:]], stats["bn" + name[4:]]
        gain = bn_params["scale"] / np.sqrt(bn_stats["var"] + BN_EPS)
        kernel = params[name]["kernel"].reshape(-1, gain.shape[0]) * gain
        bias = (params[name]["bias"] - bn_stats["mean"]) * gain + bn_params["bias"]
        tape.append(("conv", name, x, (kernel, bias)))
        x = np.maximum(_im2col(x) @ kernel + bias, 0.0)
        tape.append(("relu", name, x, None))
    return params, x, tape


def _max_pool_relevance(inputs, relevance):
    """Winner-take-all through a 2x2 max-pool: each window's relevance goes to its first maximum."""
    r_in = np.zeros_like(inputs)
    for h in range(relevance.shape[0]):
        for w in range(relevance.shape[1]):
            for c in range(relevance.shape[2]):
                i, j = np.unravel_index(np.argmax(inputs[2 * h:2 * h + 2, 2 * w:2 * w + 2, c]), (2, 2))
                r_in[2 * h + i, 2 * w + j, c] = relevance[h, w, c]
    return r_in


def _reference(model, variables, image, target, rules, epsilon=0.0, layer="input", bounds=None):
    """LRP of one image (H,W,3) in float64; rules: linear layer name -> 'epsilon' | 'zb' | (alpha, beta)."""
    params, x, tape = _numpy_trunk(model, variables, image)
    height, width, channels = x.shape
    weights, bias = params["classifier"]["kernel"], params["classifier"]["bias"]
    if model.head_pooling == "avg":
        # average pool as a dense map from the (H*W*C) flattening to C
        avg = np.zeros((height * width * channels, channels))
        for c in range(channels):
            avg[c::channels, c] = 1.0 / (height * width)
        tape.append(("avgdense", "avgpool", x, (avg, np.zeros(channels))))
        tape.append(("dense", "classifier", x.reshape(-1) @ avg, (weights, bias)))
        logits = x.reshape(-1) @ avg @ weights + bias
    else:
        flat = x.transpose(2, 0, 1).reshape(-1)
        tape.append(("flatdense", "classifier", x, (weights, bias)))
        logits = flat @ weights + bias
    relevance = np.zeros_like(logits)
    relevance[target] = logits[target]
    if bounds is None:
        bounds = (np.full(image.shape, float(np.min(image))), np.full(image.shape, float(np.max(image))))
    for kind, name, inp, extra in reversed(tape):
        if kind == "relu" and name == layer or kind == "pool" and name == layer:
            break
        if kind == "pool":
            relevance = _max_pool_relevance(inp, relevance)
        elif kind == "dense":
            relevance = _dense_relevance(inp, *extra, relevance, rules[name], epsilon=epsilon)
        elif kind == "avgdense":
            relevance = _dense_relevance(inp.reshape(-1), *extra, relevance, rules[name],
                                         epsilon=epsilon).reshape(inp.shape)
        elif kind == "flatdense":
            r_flat = _dense_relevance(inp.transpose(2, 0, 1).reshape(-1), *extra, relevance, rules[name],
                                      epsilon=epsilon)
            relevance = r_flat.reshape(inp.shape[2], inp.shape[0], inp.shape[1]).transpose(1, 2, 0)
        elif kind == "conv":
            cols = _im2col(inp)
            lows, highs = _im2col(np.asarray(bounds[0], np.float64)), _im2col(np.asarray(bounds[1], np.float64))
            r_cols = np.stack([np.stack([
                _dense_relevance(cols[h, w], *extra, relevance[h, w], rules[name], lows[h, w], highs[h, w], epsilon)
                for w in range(inp.shape[1])]) for h in range(inp.shape[0])])
            relevance = _col2im(r_cols, inp.shape)
    return relevance.sum(-1)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_pooling", ["flatten", "avg"])
def test_canonical_graph_folds_batchnorm_and_computes_the_logits(head_pooling):
    model = _model(head_pooling)
    variables, images = _variables(model), _images()
    graph = propagation_graph(model, variables, images)
    affine = [(node.name, node.kind) for node in graph.nodes if isinstance(node, Affine)]
    pool = [("pool0", "pool")] if head_pooling == "avg" else []
    assert affine == [("conv1_1", "conv"), ("conv2_1", "conv")] + pool + [("classifier", "dense")]
    chex.assert_trees_all_close(graph.forward(images)[graph.output], model.apply(variables, images),
                                rtol=1e-5, atol=1e-5)


REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "propagation_vgg_reference.npz"


@pytest.mark.parametrize("head_pooling", ["flatten", "avg"])
def test_vgg_results_unchanged(head_pooling):
    """The engine reproduces what the VGG-only implementation it replaced computed (recorded in the fixture), to the
    float32 rounding by which XLA versions differ (1e-5 relative, where a few pixels of jax 0.12 are 1.4e-5 off)."""
    recorded = np.load(REFERENCE)
    model, target = _model(head_pooling), jnp.array([1, 2, 0])
    variables, images = _variables(model, seed=7), _images(3, seed=8)
    lrp_cases = {"paper": {}, "composite": {"composite": "composite"},
                 "ab21": {"composite": Composite(default=AlphaBeta(2.0, 1.0))},
                 "eps": {"composite": Composite(default=Epsilon(0.01))},
                 "conv2_1": {"layer": "conv2_1"}, "pool1": {"layer": "pool1"}}
    for name, kwargs in lrp_cases.items():
        np.testing.assert_allclose(lrp(model, variables, images, target, **kwargs),
                                   recorded[f"{head_pooling}/lrp/{name}"], rtol=1e-4, atol=1e-6, err_msg=name)
    for layer in ("input", "conv1_1", "pool1", "conv2_1"):
        np.testing.assert_allclose(excitation_backprop(model, variables, images, target, layer=layer),
                                   recorded[f"{head_pooling}/ebp/{layer}"], rtol=1e-4, atol=1e-6, err_msg=layer)
        np.testing.assert_allclose(rap(model, variables, images, target, layer=layer, positive_only=False),
                                   recorded[f"{head_pooling}/rap/{layer}"], rtol=1e-4, atol=1e-6, err_msg=layer)


@pytest.mark.oldest
@pytest.mark.parametrize("head_pooling", ["flatten", "avg"])
def test_conservation_bias_free(head_pooling):
    model = _model(head_pooling)
    variables, images, target = _variables(model, bias_free=True), _images(), jnp.array([0, 2])
    logits = model.apply(variables, images)
    target_logit = logits[jnp.arange(2), target]
    for composite in ("paper", Composite(), Composite(default=AlphaBeta(2.0, 1.0), first=ZBox()), "composite"):
        maps = lrp(model, variables, images, target, composite=composite)
        chex.assert_shape(maps, (2, 8, 8))
        np.testing.assert_allclose(maps.sum((1, 2)), target_logit, rtol=2e-4, atol=1e-5, err_msg=str(composite))
    maps = lrp(model, variables, images, target, composite=Composite(default=Epsilon(1e-9)))
    np.testing.assert_allclose(maps.sum((1, 2)), target_logit, rtol=2e-3, atol=1e-4)
    for layer in ("conv1_1", "pool1", "conv2_1", "pool2"):  # every intermediate layer holds the same total
        np.testing.assert_allclose(lrp(model, variables, images, target, layer=layer).sum((1, 2)), target_logit,
                                   rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("head_pooling", ["flatten", "avg"])
def test_matches_numpy_reference(head_pooling):
    model = _model(head_pooling)
    variables, images, target = _variables(model), _images(), np.array([1, 2])
    names = ("conv1_1", "conv2_1", "classifier") + (("avgpool",) if head_pooling == "avg" else ())
    bounds = (np.full((8, 8, 3), -4.5), np.full((8, 8, 3), 4.5))
    cases = [  # (lrp kwargs, reference rules, reference kwargs)
        ({"composite": Composite()}, {n: (1.0, 0.0) for n in names}, {}),
        ({"composite": Composite(default=AlphaBeta(2.0, 1.0))}, {n: (2.0, 1.0) for n in names}, {}),
        ({}, {**{n: (1.0, 0.0) for n in names}, "conv1_1": "zb"}, {}),
        ({"composite": Composite(first=ZBox(-4.5, 4.5))}, {**{n: (1.0, 0.0) for n in names}, "conv1_1": "zb"},
         {"bounds": bounds}),
        ({"composite": Composite(default=Epsilon(0.1))}, {n: "epsilon" for n in names}, {"epsilon": 0.1}),
        ({"composite": Composite(first=ZBox(), by_kind={"dense": Epsilon(0.1), "pool": Epsilon(0.1)})},
         {n: "zb" if n == "conv1_1" else (1.0, 0.0) if n.startswith("conv") else "epsilon" for n in names},
         {"epsilon": 0.1}),
        ({"layer": "conv2_1"}, {n: (1.0, 0.0) for n in names}, {"layer": "conv2_1"}),
        ({"layer": "pool1"}, {n: (1.0, 0.0) for n in names}, {"layer": "pool1"}),
    ]
    for kwargs, rules, ref_kwargs in cases:
        maps = lrp(model, variables, images, target, **kwargs)
        for b in range(2):
            expected = _reference(model, variables, np.asarray(images[b]), target[b], rules, **ref_kwargs)
            np.testing.assert_allclose(maps[b], expected, rtol=1e-3, atol=1e-5, err_msg=str(kwargs))


def test_composite_by_name_kind_and_position():
    model = _model("avg")
    variables, images, target = _variables(model), _images(), jnp.array([0, 1])
    preset = lrp(model, variables, images, target, composite="composite")
    by_name = Composite(by_name={"conv1_1": ZBox(), "pool0": Epsilon(), "classifier": Epsilon()})
    by_position = Composite(first=ZBox(), last=Epsilon(), by_kind={"pool": Epsilon()})
    for composite in (by_name, by_position):
        chex.assert_trees_all_close(lrp(model, variables, images, target, composite=composite), preset,
                                    rtol=1e-6, atol=1e-7)
    graph = propagation_graph(model, variables, images)
    rules = {node.name: rule for node, rule in by_position.resolve(graph).items()}
    assert rules == {"conv1_1": ZBox(), "conv2_1": AlphaBeta(), "pool0": Epsilon(), "classifier": Epsilon()}


def test_excitation_backprop_probabilities_and_relation_to_lrp():
    model = _model("flatten")
    variables, target = _variables(model), jnp.array([0, 2])
    images = draws.uniform(jax.random.PRNGKey(3), (2, 8, 8, 3))  # non-negative pixels: MWP at the input too
    for layer in ("input", "conv1_1", "pool1", "conv2_1"):
        mwp = excitation_backprop(model, variables, images, target, layer=layer)
        assert bool((mwp >= 0).all()), layer
        np.testing.assert_allclose(mwp.sum((1, 2)), 1.0, rtol=1e-5, err_msg=layer)
    # After a ReLU, MWP is LRP-alpha1beta0 (no biases in either) started from the one-hot instead of the logit.
    logits = model.apply(variables, images)
    target_logit = logits[jnp.arange(2), target][:, None, None]
    for layer in ("conv1_1", "conv2_1"):
        chex.assert_trees_all_close(excitation_backprop(model, variables, images, target, layer=layer) * target_logit,
                                    lrp(model, variables, images, target, composite=Composite(), layer=layer),
                                    rtol=1e-4, atol=1e-6)


def test_max_pool_ties_keep_relevance():
    x = jnp.array([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 2, 1)
    (grad,) = jax.vjp(max_pool_2x2, x)[1](jnp.ones((1, 1, 1, 1)))
    np.testing.assert_allclose(grad.reshape(2, 2), [[1 / 3, 1 / 3], [0.0, 1 / 3]], rtol=1e-6)


def test_jit_equals_eager_and_batched_equals_per_image():
    model = _model("flatten")
    variables, images, target = _variables(model), _images(3), jnp.array([0, 1, 2])
    jitted = jax.jit(functools.partial(lrp, model, composite="composite"))
    eager = lrp(model, variables, images, target, composite="composite")
    chex.assert_trees_all_close(jitted(variables, images, target), eager, rtol=1e-5, atol=1e-6)
    for b in range(3):
        chex.assert_trees_all_close(lrp(model, variables, images[b:b + 1], target[b:b + 1], composite="composite")[0],
                                    eager[b], rtol=1e-5, atol=1e-6)
    jitted_ebp = jax.jit(functools.partial(excitation_backprop, model, layer="conv2_1"))
    chex.assert_trees_all_close(jitted_ebp(variables, images, target),
                                excitation_backprop(model, variables, images, target, layer="conv2_1"),
                                rtol=1e-5, atol=1e-6)
    weights = jax.nn.one_hot(target, 3)  # (B,K) weights and callables follow the library's target convention
    chex.assert_trees_all_close(lrp(model, variables, images, weights, composite="composite"), eager)
    chex.assert_trees_all_close(lrp(model, variables, images, lambda _: target, composite="composite"), eager)


def test_bad_inputs():
    model = _model("flatten")
    variables, images, target = _variables(model), _images(), jnp.array([0, 1])
    with pytest.raises(ValueError, match="unknown composite 'gamma'"):
        lrp(model, variables, images, target, composite="gamma")
    with pytest.raises(ValueError, match="start must be 'logit' or 'weight', got 'logits'"):
        propagation_maps(model, variables, images, target, "paper", start="logits")
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        AlphaBeta(2.0, 0.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        AlphaBeta(0.5, -0.5)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        Epsilon(-1.0)
    with pytest.raises(ValueError, match="low <= high"):
        ZBox(1.0, -1.0)
    with pytest.raises(ValueError, match="do not contain the layer's inputs"):
        lrp(model, variables, images, target, composite=Composite(first=ZBox(-0.5, 0.5)))
    with pytest.raises(ValueError, match="unknown layer kinds"):
        Composite(by_kind={"attention": Epsilon()})
    with pytest.raises(ValueError, match=r"layers \['conv9_9'\] that this model does not have.*conv2_1"):
        lrp(model, variables, images, target, composite=Composite(by_name={"conv9_9": Epsilon()}))
    with pytest.raises(ValueError, match="must be a rule object"):
        Composite(by_name={"conv1_1": "epsilon"})
    with pytest.raises(ValueError, match="unknown layer 'conv5_3'.*conv2_1"):
        lrp(model, variables, images, target, layer="conv5_3")
    with pytest.raises(ValueError, match="unknown layer"):
        excitation_backprop(model, variables, images, target, layer="fc7")
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 8, 8, 3\)"):
        lrp(model, variables, images[:, :4], target)
    with pytest.raises(ValueError, match="expected images"):
        excitation_backprop(model, variables, images[0], target)
