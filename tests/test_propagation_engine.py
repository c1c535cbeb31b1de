"""The propagation engine (``attribution.graph`` / ``rules`` / ``propagation`` / ``rap``) on a ResNet, VGG and NNX.

Tested against:

1. an independent float64 NumPy reference of a tiny torchvision-layout ResNet (strided conv and a ``downsample``
   shortcut in stage 2): every conv is an explicit dense matrix over the flattened (H,W,C) input built by brute-force
   loops, BatchNorm is folded in float64, the global mean and ``fc`` are matrices, and LRP runs backwards through
   explicit contribution matrices (alpha-beta, z^B, epsilon, gamma, flat, w^2, winning probability), both residual
   sum rules, ReLU pass-through and fan-out summation; the engine's maps must equal it for several composites and
   for Excitation Backprop at hidden layers (with BatchNorm folded and, at a conv output, left unfolded);
2. conservation identities on bias-free networks (VGG, the tiny ResNet, an NNX CNN with a residual add and a
   max-pool): the maps sum to the target logit (LRP, signed RAP) or to 1 (Excitation Backprop);
3. the errors promised for unsupported forward passes and bad composites;
4. the gradient of a loss of LRP maps with respect to the variables against central finite differences, and
   ``jit`` / ``vmap`` against eager batched calls.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from attrjax.attribution import excitation_backprop, lrp, propagate, propagation_graph, rap
from attrjax.attribution._graph import Affine, Sum, UnsupportedOp, trace_graph
from attrjax.attribution._rules import (COMPOSITES, AlphaBeta, Composite, Epsilon, Flat, Gamma, SumRule, WSquare,
                                       ZBox)
from attrjax.models import as_split_model, init_variables, resnet_small
from tests.test_propagation import _dense_relevance, _images, _model

BN_EPS = 1e-5
TARGET = np.array([1, 2])


def _leaf_name(path) -> str:
    """The variable's own name (``scale``, ``mean``, ...) for linen dicts and NNX states (``.value`` paths)."""
    names = [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]
    return [name for name in names if name != "value"][-1]


def _random_variables(abstract, seed, bias_free=False):
    """Random variables shaped like ``abstract`` (from ``jax.eval_shape``; linen dicts or NNX states): He-normal
    kernels, BatchNorm scales (some negative) and variances, shifts, means and biases, so the fold is not trivial;
    with ``bias_free`` every bias, BatchNorm shift and mean is zero (scales and variances stay random)."""
    rng = np.random.default_rng(seed)

    def leaf(path, value):
        name, shape = _leaf_name(path), tuple(value.shape)
        if name == "kernel":
            new = rng.normal(0.0, 1.0, shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name == "scale":
            new = rng.uniform(0.5, 1.5, shape) * np.where(rng.uniform(size=shape) < 0.2, -1.0, 1.0)
        elif name == "var":
            new = rng.uniform(0.5, 1.5, shape)
        else:
            assert name in ("bias", "mean"), name
            new = np.zeros(shape) if bias_free else rng.normal(0.0, 0.2, shape)
        return jnp.asarray(new, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


# Variables are drawn from their shapes (``jax.eval_shape`` of the init): initialising eagerly costs seconds here.


@functools.lru_cache(maxsize=None)
def _resnet(bias_free=False):
    model = resnet_small(3, stage_sizes=(1, 1), width_divisor=4)  # 4 then 8 channels; stage 2: stride 2, downsample
    images = _images()
    abstract = jax.eval_shape(as_split_model(model, images).init, jax.random.key(0), images)
    return model, _random_variables(abstract, seed=3, bias_free=bias_free), images


class _ResidualNNX(nnx.Module):
    """conv-BN-ReLU, 2x2 max-pool, conv-BN, ``+`` skip, ReLU, global mean, linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.max_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
        y = nnx.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(jnp.mean(y, axis=(1, 2)))


@functools.lru_cache(maxsize=None)
def _nnx(bias_free=False):
    images = _images()
    model = nnx.eval_shape(lambda: _ResidualNNX(nnx.Rngs(0)))
    abstract = as_split_model(model, images).initial_variables
    return model, _random_variables(abstract, seed=4, bias_free=bias_free), images


@functools.lru_cache(maxsize=None)
def _vgg(bias_free=False):
    model = _model("avg")
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
    return model, _random_variables(abstract, seed=5, bias_free=bias_free), _images()


FAMILIES = {"vgg": _vgg, "resnet": _resnet, "nnx": _nnx}
HIDDEN = {"vgg": "conv2_1", "resnet": "layer1_0", "nnx": "bn1"}  # where Excitation Backprop is read


def _target_logit(model, variables, images, target=TARGET):
    logits = as_split_model(model, images).apply(variables, images)[0]
    return np.asarray(logits)[np.arange(len(target)), target]


# ---------------------------------------------------------------------------------------------------------------
# Independent float64 NumPy reference of the tiny ResNet: explicit matrices, explicit contribution matrices.


def _conv_matrix(kernel, stride, in_shape):
    """The explicit matrix M of a conv (HWIO ``kernel``, symmetric padding kernel//2, ``stride``) with
    ``y.reshape(-1) = x.reshape(-1) @ M`` for x (H,W,Cin) and y (Ho,Wo,Cout): ``(M, (Ho, Wo, Cout))``."""
    size_h, size_w, cin, cout = kernel.shape
    height, width, _ = in_shape
    pad_h, pad_w = size_h // 2, size_w // 2
    out_h, out_w = (height + 2 * pad_h - size_h) // stride + 1, (width + 2 * pad_w - size_w) // stride + 1
    matrix = np.zeros((height, width, cin, out_h, out_w, cout))
    for ho in range(out_h):
        for wo in range(out_w):
            for dh in range(size_h):
                for dw in range(size_w):
                    h, w = ho * stride + dh - pad_h, wo * stride + dw - pad_w
                    if 0 <= h < height and 0 <= w < width:
                        matrix[h, w, :, ho, wo, :] += kernel[dh, dw]
    return matrix.reshape(height * width * cin, out_h * out_w * cout), (out_h, out_w, cout)


def _numpy_resnet(variables, image_shape, unfold=()):
    """The tiny ResNet as float64 steps: ``(steps, layers, shapes)`` (``shapes``: value -> (H,W,C)).

    ``layers``: name -> ``(matrix, bias, connected mask)`` over flattened (H,W,C) vectors; a conv and its BatchNorm
    are one folded layer (columns times ``gain = scale / sqrt(var + eps)``, bias ``(0 - mean) * gain + shift``),
    except the convs in ``unfold``, which stay a conv (no bias) followed by a diagonal BatchNorm layer. ``steps`` in
    forward order: ``("affine", out, in, layer)``, ``("relu", out, in)``, ``("sum", out, (a, b))``.
    """
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    layers, steps, shapes = {}, [], {"x": image_shape}

    def scope(tree, path):
        for part in path.split(".")[:-1]:
            tree = tree[part]
        return tree

    def conv_bn(out, source, conv, bn, stride):
        kernel = scope(params, conv)[conv.split(".")[-1]]["kernel"]
        bn_params, bn_stats = scope(params, bn)[bn.split(".")[-1]], scope(stats, bn)[bn.split(".")[-1]]
        matrix, shape = _conv_matrix(kernel, stride, shapes[source])
        mask = _conv_matrix(np.ones_like(kernel), stride, shapes[source])[0] != 0
        positions = shape[0] * shape[1]
        gain = bn_params["scale"] / np.sqrt(bn_stats["var"] + BN_EPS)
        bias = np.tile((0.0 - bn_stats["mean"]) * gain + bn_params["bias"], positions)
        if conv in unfold:
            layers[conv] = (matrix, np.zeros(matrix.shape[1]), mask)
            layers[bn] = (np.diag(np.tile(gain, positions)), bias, np.eye(matrix.shape[1], dtype=bool))
            steps.extend([("affine", conv, source, conv), ("affine", out, conv, bn)])
        else:
            layers[conv] = (matrix * np.tile(gain, positions)[None, :], bias, mask)
            steps.append(("affine", out, source, conv))
        shapes[out] = shapes[conv] = shape

    def relu(out, source):
        steps.append(("relu", out, source))
        shapes[out] = shapes[source]

    def add(out, a, b):
        steps.append(("sum", out, (a, b)))
        shapes[out] = shapes[a]

    conv_bn("a0", "x", "conv1", "bn1", 1)
    relu("stem", "a0")
    conv_bn("a1", "stem", "layer1_0.conv1", "layer1_0.bn1", 1)
    relu("h1", "a1")
    conv_bn("a2", "h1", "layer1_0.conv2", "layer1_0.bn2", 1)
    add("s1", "a2", "stem")
    relu("layer1_0", "s1")
    conv_bn("a3", "layer1_0", "layer2_0.conv1", "layer2_0.bn1", 2)
    relu("h3", "a3")
    conv_bn("a4", "h3", "layer2_0.conv2", "layer2_0.bn2", 1)
    conv_bn("a5", "layer1_0", "layer2_0.downsample_0", "layer2_0.downsample_1", 2)
    add("s2", "a4", "a5")
    relu("layer2_0", "s2")
    height, width, channels = shapes["layer2_0"]
    mean = np.zeros((height * width * channels, channels))
    for c in range(channels):
        mean[c::channels, c] = 1.0 / (height * width)
    layers["pool"] = (mean, np.zeros(channels), mean != 0)
    layers["fc"] = (params["fc"]["kernel"], params["fc"]["bias"], np.ones(params["fc"]["kernel"].shape, bool))
    steps.extend([("affine", "pooled", "layer2_0", "pool"), ("affine", "logits", "pooled", "fc")])
    return steps, layers, shapes


def _safe(a, b):
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def _rule_relevance(rule, x, layer, relevance):
    """Relevance (n,) of the input x (n,) of ``z = x W + b`` from that of its outputs (m,); rule: ``("ab", alpha,
    beta)``, ``("eps", epsilon)``, ``("zb",)`` (bounds: min and max of x), ``("gamma", gamma, epsilon)``,
    ``("flat",)``, ``("wsq",)`` or ``("wp",)``."""
    weights, bias, mask = layer
    kind = rule[0]
    if kind == "ab":
        return _dense_relevance(x, weights, bias, relevance, rule[1:])
    if kind == "eps":
        return _dense_relevance(x, weights, bias, relevance, "epsilon", epsilon=rule[1])
    if kind == "zb":
        return _dense_relevance(x, weights, bias, relevance, "zb", np.full_like(x, x.min()), np.full_like(x, x.max()))
    if kind == "gamma":
        gamma, epsilon = rule[1:]
        boosted = weights + gamma * np.maximum(weights, 0)
        z = x @ boosted + bias + gamma * np.maximum(bias, 0)
        return ((x[:, None] * boosted) / (z + epsilon * np.where(z >= 0, 1.0, -1.0)) * relevance).sum(1)
    if kind in ("flat", "wsq"):
        coefficients = mask.astype(np.float64) if kind == "flat" else weights ** 2
        return coefficients @ _safe(relevance, coefficients.sum(0))
    assert kind == "wp"
    excitatory = np.maximum(weights, 0)
    z = x @ excitatory
    return x * (excitatory @ np.where(z > 0, _safe(relevance, z), 0.0))


def _numpy_forward(steps, layers, image):
    """Every value of the NumPy network for one image (H,W,3), flattened."""
    values = {"x": image.reshape(-1)}
    for step in steps:
        if step[0] == "affine":
            matrix, bias, _ = layers[step[3]]
            values[step[1]] = values[step[2]] @ matrix + bias
        elif step[0] == "relu":
            values[step[1]] = np.maximum(values[step[2]], 0.0)
        else:
            values[step[1]] = values[step[2][0]] + values[step[2][1]]
    return values


def _reference_maps(variables, images, start, rules, sum_positive, layer="x", unfold=()):
    """Relevance maps (B,H,W) of the NumPy ResNet at value ``layer``, started from ``start(logits) -> (K,)``;
    ``rules(layer name) -> rule``."""
    steps, layers, shapes = _numpy_resnet(variables, images.shape[1:], unfold)
    maps = []
    for image in np.asarray(images, np.float64):
        values = _numpy_forward(steps, layers, image)
        incoming = {"logits": start(values["logits"])}
        for step in reversed(steps):
            if step[1] == layer:
                break
            relevance = incoming.pop(step[1], None)
            if relevance is None:
                continue
            if step[0] == "affine":
                sent = {step[2]: _rule_relevance(rules(step[3]), values[step[2]], layers[step[3]], relevance)}
            elif step[0] == "relu":
                sent = {step[2]: relevance}
            else:
                branches = [values[name] for name in step[2]]
                if sum_positive:
                    branches = [np.maximum(branch, 0.0) for branch in branches]
                share = _safe(relevance, branches[0] + branches[1])
                sent = {name: branch * share for name, branch in zip(step[2], branches)}
            for name, r in sent.items():
                incoming[name] = incoming.get(name, 0.0) + r
        maps.append(incoming[layer].reshape(shapes[layer]).sum(-1))
    return np.stack(maps)


def _lrp_start(target):
    def start(logits):
        out = np.zeros_like(logits)
        out[target] = logits[target]
        return out
    return start


def _one_hot_start(target):
    return lambda logits: np.eye(len(logits))[target]


def test_canonical_graph_of_the_resnet():
    """BatchNorm folds into every conv, the shortcut add is a Sum, and the graph computes the model's logits."""
    model, variables, images = _resnet()
    graph = propagation_graph(model, variables, images)
    affine = [(node.name, node.kind) for node in graph.nodes if isinstance(node, Affine)]
    assert affine == [("conv1", "conv"), ("layer1_0.conv1", "conv"), ("layer1_0.conv2", "conv"),
                      ("layer2_0.conv1", "conv"), ("layer2_0.conv2", "conv"), ("layer2_0.downsample_0", "conv"),
                      ("pool0", "pool"), ("fc", "dense")]
    assert sum(isinstance(node, Sum) for node in graph.nodes) == 2
    assert graph.positions() == (frozenset({"conv1"}), frozenset({"fc"}))
    logits = model.apply(variables, images)
    np.testing.assert_allclose(graph.forward(images)[graph.output], logits, rtol=1e-5, atol=1e-5)
    # The NumPy reference network computes the same logits (so its layout and fold are the model's).
    steps, layers, _ = _numpy_resnet(variables, images.shape[1:])
    reference = [_numpy_forward(steps, layers, image)["logits"] for image in np.asarray(images, np.float64)]
    np.testing.assert_allclose(np.stack(reference), logits, rtol=1e-5, atol=1e-5)


def _assert_matches(maps, expected, what, rtol=1e-3, atol_fraction=1e-4):
    chex.assert_shape(maps, expected.shape)
    assert np.abs(expected).max() > 1e-3, what  # the reference map is not trivially zero
    np.testing.assert_allclose(maps, expected, rtol=rtol, atol=atol_fraction * np.abs(expected).max(), err_msg=what)


RESNET_CASES = {  # name: (composite, reference rule of each layer name, positive-part sum rule)
    "paper": ("paper", lambda name: ("zb",) if name == "conv1" else ("ab", 1.0, 0.0), True),
    "ab21_dense_eps": (Composite(default=AlphaBeta(2.0, 1.0), by_kind={"dense": Epsilon(0.1)}, sums=SumRule()),
                       lambda name: ("eps", 0.1) if name == "fc" else ("ab", 2.0, 1.0), False),
    "gamma": (Composite(default=Gamma(0.25, 1e-6)), lambda name: ("gamma", 0.25, 1e-6), False),
    "conv_gamma_flat": (Composite(default=Epsilon(0.01), by_kind={"conv": Gamma(0.25)}, first=Flat(),
                                  sums=SumRule(positive=True)),
                        lambda name: ("flat",) if name == "conv1" else ("gamma", 0.25, 1e-6)
                        if name.startswith("layer") else ("eps", 0.01), True),
    "wsquare": (Composite(first=WSquare(), by_name={"fc": Epsilon(0.01)}),
                lambda name: ("wsq",) if name == "conv1" else ("eps", 0.01) if name == "fc" else ("ab", 1.0, 0.0),
                False),
}


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_lrp_matches_numpy_resnet_reference(case):
    composite, rules, sum_positive = RESNET_CASES[case]
    model, variables, images = _resnet()
    maps = np.asarray(lrp(model, variables, images, TARGET, composite=composite))
    for b in range(len(TARGET)):
        expected = _reference_maps(variables, images[b:b + 1], _lrp_start(TARGET[b]), rules, sum_positive)
        _assert_matches(maps[b:b + 1], expected, f"{case}, image {b}")


def test_lrp_and_excitation_backprop_at_hidden_layers_match_numpy_reference():
    model, variables, images = _resnet()
    ab = lambda name: ("ab", 1.0, 0.0)  # noqa: E731
    wp = lambda name: ("wp",)  # noqa: E731
    cases = [  # (engine maps, reference kwargs)
        (lrp(model, variables, images, TARGET, layer="layer1_0"),
         dict(start=_lrp_start, rules=ab, sum_positive=True, layer="layer1_0")),
        (excitation_backprop(model, variables, images, TARGET, layer="layer1_0"),
         dict(start=_one_hot_start, rules=wp, sum_positive=True, layer="layer1_0")),
        # At a conv's own output its BatchNorm cannot fold (the conv output is the value read): it stays a separate
        # elementwise layer with the winning-probability rule.
        (excitation_backprop(model, variables, images, TARGET, layer="layer2_0.conv1"),
         dict(start=_one_hot_start, rules=wp, sum_positive=True, layer="layer2_0.conv1",
              unfold=("layer2_0.conv1",))),
    ]
    for maps, kwargs in cases:
        start = kwargs.pop("start")
        for b in range(len(TARGET)):
            expected = _reference_maps(variables, images[b:b + 1], start(TARGET[b]), **kwargs)
            _assert_matches(np.asarray(maps[b:b + 1]), expected, f"{kwargs['layer']}, image {b}")


# ---------------------------------------------------------------------------------------------------------------
# Conservation on bias-free networks.

CONSERVING = {
    "paper": "paper",
    "ab21_zbox": Composite(default=AlphaBeta(2.0, 1.0), first=ZBox(), sums=SumRule(positive=True)),
    "flat": Composite(first=Flat(), sums=SumRule(positive=True)),
    "wsquare": Composite(first=WSquare(), sums=SumRule(positive=True)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conservation_on_bias_free_networks(family):
    model, variables, images = FAMILIES[family](bias_free=True)
    logit = _target_logit(model, variables, images)
    assert np.abs(logit).min() > 1e-3
    for name, composite in CONSERVING.items():
        total = np.asarray(lrp(model, variables, images, TARGET, composite=composite)).sum((1, 2))
        np.testing.assert_allclose(total, logit, rtol=1e-4, err_msg=f"{family} {name}")
    total = np.asarray(rap(model, variables, images, TARGET, positive_only=False)).sum((1, 2))
    np.testing.assert_allclose(total, logit, rtol=1e-4, err_msg=f"{family} rap")
    mwp = np.asarray(excitation_backprop(model, variables, images, TARGET, layer=HIDDEN[family]))
    assert (mwp >= 0).all()
    np.testing.assert_allclose(mwp.sum((1, 2)), 1.0, rtol=1e-5, err_msg=f"{family} ebp")


def test_signed_sum_rule_is_not_the_positive_one():
    """The sum rule matters (the reference tests tell the two apart): on the ResNet the signed and positive-part
    rules give different maps, and z^B + alpha1-beta0 with the positive-part rule is the paper preset."""
    model, variables, images = _resnet()
    positive = lrp(model, variables, images, TARGET, composite=Composite(first=ZBox(), sums=SumRule(positive=True)))
    signed = lrp(model, variables, images, TARGET, composite=Composite(first=ZBox(), sums=SumRule()))
    chex.assert_trees_all_close(positive, lrp(model, variables, images, TARGET), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(positive - signed).max()) > 1e-3 * float(jnp.abs(positive).max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_preset_runs(family):
    model, variables, images = FAMILIES[family]()
    for name in COMPOSITES:
        function = excitation_backprop if name == "excitation_backprop" else lrp
        maps = function(model, variables, images, TARGET, composite=name)
        chex.assert_shape(maps, (2, 8, 8))
        chex.assert_tree_all_finite(maps)
        assert float(jnp.abs(maps).max()) > 0, (family, name)


# ---------------------------------------------------------------------------------------------------------------
# Errors and pass-through.


def _linen_model(middle):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = middle(nn.Conv(4, (3, 3), name="conv")(x))
            return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))

    model = Model()
    return model, _random_variables(jax.eval_shape(model.init, jax.random.key(0), _images()), seed=6)


@pytest.mark.parametrize("middle, message", [
    (jnp.exp, r"`exp` in Model: it has no propagation rule \(a softmax written by hand"),
    (lax.erf, r"`erf` in Model: .*pass passthrough=\('erf',\)"),
    (lambda x: 1.0 / (x * x + 1.0), r"`div` in Model: the input is in the denominator.*Read relevance"),
    (lambda x: x / jnp.abs(x - 1.0), r"`abs` in Model: it has no propagation rule; `div` in Model: it divides by an "
     r"input-dependent value"),
], ids=["exp", "erf", "reciprocal", "every-op-named"])
def test_unsupported_ops_raise_naming_the_primitive(middle, message):
    model, variables = _linen_model(middle)
    with pytest.raises(UnsupportedOp, match=message):
        lrp(model, variables, _images(), TARGET)


@pytest.mark.parametrize("middle, passthrough", [(jnp.tanh, ()), (lax.erf, ("erf",))], ids=["tanh", "erf"])
def test_elementwise_pass_through(middle, passthrough):
    model, variables = _linen_model(middle)
    images = _images()
    maps = lrp(model, variables, images, TARGET, passthrough=passthrough)
    chex.assert_shape(maps, (2, 8, 8))
    # z^B at the conv, alpha1-beta0 at the head: relevance passing the activation unchanged is conserved.
    np.testing.assert_allclose(maps.sum((1, 2)), _target_logit(model, variables, images), rtol=1e-4)
    # The activation is part of the forward pass (changing it changes the map).
    other, other_variables = _linen_model(lambda x: x)
    assert float(jnp.abs(maps - lrp(other, other_variables, images, TARGET)).max()) > 1e-4


def test_train_mode_batchnorm_raises():
    def forward(variables, images):
        h = jnp.einsum("bhwc,cd->bhwd", images, variables["w"])
        mean, var = jnp.mean(h, axis=(0, 1, 2)), jnp.var(h, axis=(0, 1, 2))  # batch statistics
        return jnp.mean((h - mean) / jnp.sqrt(var + BN_EPS), axis=(1, 2))

    variables, images = {"w": jnp.ones((3, 4))}, _images()
    graph = trace_graph(forward, variables, images)
    values = graph.forward(images)
    with pytest.raises(UnsupportedOp, match="statistics over the batch.*eval-mode forward pass"):
        propagate(graph, values, values[graph.output], COMPOSITES["paper"])
    # The same forward pass with constant (running) statistics traces, BatchNorm folded into the dense map.
    graph = trace_graph(lambda v, x: jnp.mean((jnp.einsum("bhwc,cd->bhwd", x, v["w"]) - 0.5) / 2.0, axis=(1, 2)),
                        variables, images)
    assert [node.kind for node in graph.affine_nodes] == ["dense", "pool"]


def test_nnx_layers_are_named_by_their_attribute_paths():
    model, variables, images = _nnx()
    graph = propagation_graph(model, variables, images)
    assert [node.name for node in graph.affine_nodes] == ["conv1", "conv2", "pool0", "fc"]
    eps_conv2 = lrp(model, variables, images, TARGET, composite=Composite(by_name={"conv2": Epsilon(0.5)}))
    eps_all_but_conv1 = lrp(model, variables, images, TARGET,
                            composite=Composite(first=AlphaBeta(), by_kind={"conv": Epsilon(0.5)}))
    chex.assert_trees_all_close(eps_conv2, eps_all_but_conv1, rtol=1e-6, atol=1e-7)


def test_composite_naming_a_missing_layer_lists_the_layers():
    model, variables, images = _resnet()
    with pytest.raises(ValueError, match=r"\['layer9_9.conv1'\] that this model does not have.*layer2_0.downsample_0"):
        lrp(model, variables, images, TARGET, composite=Composite(by_name={"layer9_9.conv1": Epsilon()}))


# ---------------------------------------------------------------------------------------------------------------
# Differentiability, jit and vmap.


def test_gradient_of_lrp_loss_matches_finite_differences():
    """The reverse-mode gradient (jitted) of a loss of LRP maps with respect to all variables of the ResNet, along a
    random direction, against central differences of the (eager) loss; the composite mixes z^B, alpha2-beta1,
    gamma, epsilon and the positive-part sum rule.

    Not gamma at the input layer (signed inputs) or before a signed sum rule: there gamma's denominators come within
    ~1e-3 of a pole along such a direction, and no float32 finite difference approximates the derivative (the
    engine's derivative does agree with differences at steps far below that distance). Nor VGG at this step: its
    max-pools' winner-take-all makes the maps jump where an arg-max changes."""
    model, variables, images = _resnet()
    composite = Composite(default=AlphaBeta(2.0, 1.0), by_kind={"dense": Epsilon(0.1)},
                          by_name={"layer2_0.conv1": Gamma(0.25)}, first=ZBox(), sums=SumRule(positive=True))
    rng = np.random.default_rng(5)  # NumPy throughout: eager JAX ops on many small shapes compile one by one
    fixed = jnp.asarray(rng.normal(0.0, 0.1, (2, 8, 8)), jnp.float32)

    def loss(v):
        return jnp.sum((lrp(model, v, images, TARGET, composite=composite) - fixed) ** 2)

    params = jax.tree.map(np.asarray, variables)
    direction = jax.tree.map(lambda p: rng.normal(0.0, 1.0, p.shape) * (p.std() + 0.1), params)
    grad = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(variables))
    analytic = sum(float(np.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    h = 1e-3
    shifted = [float(loss(jax.tree.map(lambda p, d, s=s: jnp.asarray(p + s * h * d, jnp.float32), params, direction)))
               for s in (1.0, -1.0)]
    numeric = (shifted[0] - shifted[1]) / (2 * h)
    assert abs(analytic) > 0.1
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_jit_and_vmap_equal_eager():
    model, variables, images = _resnet()
    target = jnp.asarray(TARGET)
    eager = lrp(model, variables, images, target)
    jitted = jax.jit(functools.partial(lrp, model))(variables, images, target)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
    # A vmap over a leading axis of single-image batches gives the batched result (jitted: one compilation).
    mapped = jax.jit(jax.vmap(lambda x, t: lrp(model, variables, x, t)))(images[:, None], target[:, None])
    chex.assert_shape(mapped, (2, 1, 8, 8))
    chex.assert_trees_all_close(mapped[:, 0], eager, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(eager[0] - eager[1]).max()) > 1e-3  # the two images differ, so the order is checked
