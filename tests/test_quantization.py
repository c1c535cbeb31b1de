"""Quantized networks: PTQ against an independent NumPy integer computation, the straight-through derivatives of the
matching loss against forward-mode autodiff of the frozen-noise surrogate, QAT staying on the grid, the deployed
checkpoint, attribution of a quantized network, bad input."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import draws
from attrjax import quantization as quant
from attrjax.attribution import lrp
from attrjax.matching import matching_loss
from attrjax.pruning import storage_bytes
from attrjax.train import Objective, TrainState, gradcam_map, make_train_step


class TinyCNN(nn.Module):
    """conv 3x3 -> relu -> conv 3x3 stride 2 ("block") -> relu -> mean -> dense."""

    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), use_bias=self.use_bias, name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, use_bias=self.use_bias, name="block")(x))
        return nn.Dense(5, use_bias=self.use_bias, name="fc")(jnp.mean(x, axis=(1, 2)))


IMAGES = draws.normal(jax.random.key(0), (6, 12, 12, 3))


def _largest_weights_positive(params):
    """Flips each output channel of every kernel so that its largest-magnitude weight is positive: the channel's
    scale puts that weight exactly on the grid's tie 2^(b-1) - 0.5, which float32 division resolves either way at
    the last bit; a positive tie saturates to 2^(b-1) - 1 on both sides of it, a negative one would not."""
    def flip(path, leaf):
        if path[-1].key != "kernel":
            return leaf
        flat = leaf.reshape(-1, leaf.shape[-1])
        return leaf * jnp.sign(flat[jnp.argmax(jnp.abs(flat), axis=0), jnp.arange(leaf.shape[-1])])
    return jax.tree_util.tree_map_with_path(flip, params)


@pytest.fixture(scope="module")
def tiny():
    model = TinyCNN()
    variables = model.init(jax.random.key(1), IMAGES[:1])
    return model, {"params": _largest_weights_positive(variables["params"])}


def _np_quantize(x, scale, bits):
    """Round-half-even of x / scale, saturated to the signed b-bit range."""
    steps = np.asarray(x, np.float64) / np.asarray(scale, np.float64)
    return np.clip(np.round(steps), -2 ** (bits - 1), 2 ** (bits - 1) - 1).astype(np.int64)


def _np_conv_int(q, w, stride):
    """SAME-padded 3x3 conv of integer arrays, accumulated exactly in int64."""
    b, h, wd, _ = q.shape
    out_h, out_w = -(-h // stride), -(-wd // stride)
    pad_h, pad_w = max((out_h - 1) * stride + 3 - h, 0), max((out_w - 1) * stride + 3 - wd, 0)
    padded = np.pad(q, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    acc = np.zeros((b, out_h, out_w, w.shape[-1]), np.result_type(q, w))
    for i in range(3):
        for j in range(3):
            acc += padded[:, i:i + out_h * stride:stride, j:j + out_w * stride:stride, :] @ w[i, j]
    return acc


def _np_network(params, images, act_scales, bits, *, observe=None):
    """The tiny network in NumPy with b-bit integer convs and matmul: weights per output channel
    (max|W| / (2^(b-1) - 0.5)), activations per tensor at ``act_scales[layer]``. ``observe(layer, x)``, when given,
    sees each layer's float input and returns the scale to use."""
    x = np.asarray(images, np.float64)
    for layer, stride in (("conv1", 1), ("block", 2), ("fc", None)):
        kernel, bias = (np.asarray(params[layer][k], np.float64) for k in ("kernel", "bias"))
        reduce_axes = tuple(range(kernel.ndim - 1))
        w_scale = np.max(np.abs(kernel), axis=reduce_axes) / (2 ** (bits - 1) - 0.5)
        q_w = _np_quantize(kernel, w_scale, bits)
        a_scale = observe(layer, x) if observe else act_scales[layer]
        q_x = _np_quantize(x, a_scale, bits)
        acc = _np_conv_int(q_x, q_w, stride) if stride else q_x @ q_w
        x = acc * (a_scale * w_scale) + bias
        if stride:
            x = np.maximum(x, 0.0)
            if layer == "block":
                x = x.mean(axis=(1, 2))
    return x


def _np_calibrate(params, batches, bits):
    """Per layer: the running mean over batches of the mean per-image max|input| (each batch quantized with the
    running mean so far, as calibration runs the quantized network), over 2^(b-1) - 0.5."""
    sums, count, bound = {}, 0, 2 ** (bits - 1) - 0.5
    for batch in batches:
        count += 1

        def observe(layer, x):
            per_image = np.max(np.abs(x.reshape(len(x), -1)), axis=1).mean()
            sums[layer] = sums.get(layer, 0.0) + per_image
            return sums[layer] / count / bound

        _np_network(params, batch, None, bits, observe=observe)
    return {layer: total / count / bound for layer, total in sums.items()}


@pytest.mark.parametrize("bits", [8, 4])
def test_ptq_equals_numpy_integer_network(tiny, bits):
    model, variables = tiny
    batches = [IMAGES[:3], IMAGES[3:]]
    quantized = quant.calibrate(model, variables, batches, quant.Quantization(bits))
    expected = _np_network(variables["params"], IMAGES, _np_calibrate(variables["params"], batches, bits), bits)
    # The float view computes the integer network (it trains and attributes in its place).
    chex.assert_trees_all_close(np.asarray(quantized.apply(variables, IMAGES)[0], np.float64), expected, rtol=1e-4,
                                atol=1e-5)
    deployed = quant.deploy(quantized, variables)
    kernels = {path[0].key: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(deployed.variables["params"])[0]
               if jnp.issubdtype(leaf.dtype, jnp.integer)}
    assert sorted(kernels) == ["block", "conv1", "fc"]
    for layer, qvalue in kernels.items():
        kernel = np.asarray(variables["params"][layer]["kernel"])
        scale = np.max(np.abs(kernel), axis=tuple(range(kernel.ndim - 1))) / (2 ** (bits - 1) - 0.5)
        assert qvalue.dtype == quant.BITS[bits]
        np.testing.assert_array_equal(np.asarray(qvalue.astype(jnp.int8)), _np_quantize(kernel, scale, bits))
    # Storage: integer kernels at their width, float biases and per-channel scales.
    assert storage_bytes(deployed.variables) < storage_bytes(variables) * (0.5 if bits == 8 else 0.4)
    if bits == 8:  # (XLA's CPU backend has no int4 convolution)
        chex.assert_trees_all_close(np.asarray(deployed.apply(IMAGES), np.float64), expected, rtol=1e-4, atol=1e-5)


def test_qat_steps_stay_on_the_grid(tiny):
    model, variables = tiny
    quantized = quant.calibrate(model, variables, [IMAGES])
    labels = (draws.uniform(jax.random.key(2), (6, 5)) > 0.5).astype(jnp.float32)
    tx = optax.adam(1e-2)
    step = jax.jit(make_train_step(quantized, tx, Objective()))
    state = TrainState.create(variables, tx)
    for k in range(3):
        state, metrics = step(state, None, {"image": IMAGES, "labels": labels}, jax.random.key(k))
        assert bool(metrics["state_finite"])
        weights = quant.grid_values(quantized, state.variables)
        assert set(weights) == {"conv1/kernel", "block/kernel", "fc/kernel"}
        for path, values in weights.items():
            kernel = state.variables["params"][path.split("/")[0]]["kernel"]
            scale = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1))) / 127.5
            steps = values / scale
            chex.assert_trees_all_close(steps, jnp.round(steps), atol=1e-3)  # integers
            assert float(jnp.max(jnp.abs(steps))) <= 128
        # The trained float view and the deployed integer network agree after every step.
        chex.assert_trees_all_close(quantized.apply(state.variables, IMAGES)[0],
                                    quant.deploy(quantized, state.variables).apply(IMAGES), atol=1e-5)
    assert not np.allclose(state.params["fc"]["kernel"], variables["params"]["fc"]["kernel"])


class _FrozenNoise(quant.StraightThroughProvider):
    """Records each quantizer's error q(x0) - x0 at a point, then replays it as a constant: x -> x + error, the
    smooth network whose ordinary derivatives the straight-through estimator stands for."""

    def __init__(self, rules, errors=None):
        super().__init__(rules)
        self.errors, self.recorded = errors, []

    def _fake_quant(self, x, how, rule, stat_name):
        if self.errors is None:
            out = super()._fake_quant(x, how, rule, stat_name)
            if not isinstance(out, jax.core.Tracer):  # the eager pass, not a shape-tracing one
                self.recorded.append(out - x)
            return out
        self.recorded.append(None)  # every forward pass (the layer-finding one too) calls the quantizers in order
        return x + self.errors[(len(self.recorded) - 1) % len(self.errors)]


def _matching_loss_at_conv1(split, variables, params, teacher_maps, target):
    """The matching loss of Grad-CAM at conv1, so the head (block conv, mean, dense) holds a quantized conv."""
    lin = split.linearize({**variables, "params": params}, IMAGES, "conv1")
    return matching_loss(teacher_maps, gradcam_map(lin.activations, lin.vjp(jax.nn.one_hot(target, 5))))


def test_matching_gradient_through_a_quantized_head_is_straight_through(tiny):
    """Reverse over reverse through the straight-through quantizers equals forward-mode autodiff of the frozen-error
    surrogate at every order the matching loss uses (the student's gradient at the layer, then its derivative)."""
    model, variables = tiny
    quantized = quant.calibrate(model, variables, [IMAGES])
    teacher_maps = draws.uniform(jax.random.key(3), (6, 12, 12))
    target = jnp.arange(6) % 5
    loss = functools.partial(_matching_loss_at_conv1, quantized, variables, teacher_maps=teacher_maps, target=target)
    grads = jax.grad(loss)(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

    ranges = {**variables, quant.QUANT_STATS: quantized.quant_stats}
    recorder = _FrozenNoise(quantized.quantization.rules())
    quant.as_split_model(quant._quantized_module(model, recorder), IMAGES[:1]).apply(ranges, IMAGES)
    errors = recorder.recorded

    def surrogate(params):
        split = quant.as_split_model(quant._quantized_module(model, _FrozenNoise(quantized.quantization.rules(),
                                                                                 errors)), IMAGES[:1])
        return _matching_loss_at_conv1(split, ranges, params, teacher_maps, target)

    chex.assert_trees_all_close(surrogate(variables["params"]), loss(variables["params"]), rtol=1e-5)
    direction = jax.tree.map(lambda p: draws.normal(jax.random.key(4), p.shape), variables["params"])
    _, expected = jax.jvp(surrogate, (variables["params"],), (direction,))
    actual = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    chex.assert_trees_all_close(actual, expected, rtol=1e-4)
    # The head's conv gets its gradient only through the map's channel weights: a second derivative.
    assert float(jnp.linalg.norm(grads["block"]["kernel"])) > 0


def test_propagation_through_a_quantized_network_conserves_the_logit():
    """LRP on the quantized forward pass: the dequantized weights, relevance passing each activation quantizer
    unchanged; with no biases the map sums to the target logit of the quantized network."""
    model = TinyCNN(use_bias=False)
    variables = {"params": _largest_weights_positive(model.init(jax.random.key(5), IMAGES[:1])["params"])}
    quantized = quant.calibrate(model, variables, [IMAGES])
    target = jnp.arange(6) % 5
    maps = lrp(quantized, variables, IMAGES, target, composite="epsilon_plus")
    logits = quantized.apply(variables, IMAGES)[0]
    chex.assert_trees_all_close(maps.sum(axis=(1, 2)), logits[jnp.arange(6), target], rtol=1e-4, atol=1e-6)
    float_maps = lrp(model, variables, IMAGES, target, composite="epsilon_plus")
    assert not np.allclose(maps, float_maps, atol=1e-6)  # the quantized weights, not the float ones


def test_deployed_checkpoint_round_trips_and_refuses_other_networks(tiny, tmp_path):
    model, variables = tiny
    quantized = quant.calibrate(model, variables, [IMAGES])
    deployed = quant.deploy(quantized, variables)
    path = str(tmp_path / "int8.npz")
    deployed.save(path)
    loaded = quant.load_deployed(path, quantized)
    chex.assert_trees_all_equal(jax.tree.leaves(loaded.variables), jax.tree.leaves(deployed.variables))
    chex.assert_trees_all_close(loaded.apply(IMAGES), deployed.apply(IMAGES))
    int4 = quant.calibrate(model, variables, [IMAGES], quant.Quantization(4))
    with pytest.raises(ValueError, match="holds a int8 network, but the model is int4"):
        quant.load_deployed(path, int4)
    quant.deploy(int4, variables).save(str(tmp_path / "int4.npz"))
    chex.assert_trees_all_equal(jax.tree.leaves(quant.load_deployed(str(tmp_path / "int4.npz"), int4).variables),
                                jax.tree.leaves(quant.deploy(int4, variables).variables))
    np.savez(tmp_path / "float.npz", *jax.tree.leaves(variables))  # a float checkpoint
    with pytest.raises(ValueError, match="not a deployed quantized network"):
        quant.load_deployed(str(tmp_path / "float.npz"), quantized)
    wider = quant.calibrate(TinyCNN(use_bias=False), {"params": {k: {"kernel": v["kernel"]} for k, v in
                                                                 variables["params"].items()}}, [IMAGES])
    with pytest.raises(ValueError, match="another architecture"):
        quant.load_deployed(path, wider)


def test_bad_input_is_refused(tiny):
    model, variables = tiny
    for bits in (3, 16, True, "8"):
        with pytest.raises(ValueError, match="quantization bits must be one of"):
            quant.Quantization(bits)
    with pytest.raises(ValueError, match="at least one batch"):
        quant.calibrate(model, variables, [])
    with pytest.raises(ValueError, match="images"):
        quant.calibrate(model, variables, [IMAGES[0]])
    quantized = quant.calibrate(model, variables, [IMAGES])
    with pytest.raises(ValueError, match="quantized already"):
        quant.calibrate(quantized, variables, [IMAGES])
    with pytest.raises(ValueError, match="carry a 'quant_stats' collection"):
        quantized.apply({**variables, quant.QUANT_STATS: quantized.quant_stats}, IMAGES)
    fresh = quantized.module.init(jax.random.key(0), IMAGES[:1])[quant.QUANT_STATS]
    with pytest.raises(ValueError, match="never calibrated"):
        quant.QuantizedModel(model, quant.Quantization(), fresh, IMAGES[:1])
    with pytest.raises(TypeError, match="Flax linen"):
        quant.calibrate(lambda v, x: x, variables, [IMAGES])
