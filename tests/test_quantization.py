"""Quantized networks: PTQ against an independent NumPy integer computation, the straight-through derivatives of the
matching loss against forward-mode autodiff of the frozen-noise surrogate, QAT staying on the grid, the deployed
checkpoint (and what it refuses to load), attribution of a quantized network, bad input, a refused rerun of
experiments.quantize."""

import functools
import json
import re

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
from attrjax._matching import matching_loss
from attrjax._paths import path_name
from attrjax.pruning import storage_bytes
from attrjax.training import (Objective, RunConfigMismatchError, TrainState, bind_run_config, gradcam_map,
                              make_train_step)
from experiments import configuration, quantize, runs


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


@pytest.mark.oldest
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


@pytest.mark.oldest
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
        error = self.errors[(len(self.recorded) - 1) % len(self.errors)]
        return x + error[:len(x)]  # the layer-finding trace runs a batch of 2


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


def _replace_leaves(variables, is_target, replace):
    """``variables`` with every leaf ``is_target(path name, leaf)`` selects replaced by ``replace(leaf)``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: replace(leaf) if is_target(path_name(path), leaf) else leaf, variables)


def test_a_deployed_file_that_was_changed_or_holds_impossible_values_is_refused(tiny, tmp_path):
    model, variables = tiny
    quantized = quant.calibrate(model, variables, [IMAGES])
    deployed = quant.deploy(quantized, variables)
    path = str(tmp_path / "int8.npz")
    deployed.save(path)
    meta = json.loads((tmp_path / "int8.npz.json").read_text())
    assert meta["format"] == quant.DEPLOYED_FORMAT and len(meta["arrays"]["00000"]["sha256"]) == 64
    original = (tmp_path / "int8.npz").read_bytes()
    # Negated integer weights: a valid file of the right shapes, but not the one that was saved.
    with np.load(path) as npz:
        arrays = {key: -npz[key] if npz[key].dtype == np.int8 else npz[key] for key in npz.files}
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=re.escape(path) + ": array .* does not match its checksum"):
        quant.load_deployed(path, quantized)
    # A changed byte inside the archive.
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "int8.npz").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=re.escape(path) + " (is damaged|: array .* does not match its checksum)"):
        quant.load_deployed(path, quantized)
    # A NaN saved with its checksum is refused by name, not loaded as a finite number.
    quant.DeployedModel(quantized, _replace_leaves(deployed.variables, lambda name, _: name == "params/conv1/bias",
                                                   lambda leaf: leaf.at[0].set(jnp.nan))).save(path)
    with pytest.raises(ValueError, match="params/conv1/bias holds 1 non-finite values"):
        quant.load_deployed(path, quantized)
    # An int4 weight of 100 (stored as int8) is refused, not wrapped to 4.
    int4 = quant.calibrate(model, variables, [IMAGES], quant.Quantization(4))
    quant.DeployedModel(int4, _replace_leaves(quant.deploy(int4, variables).variables,
                                              lambda name, leaf: name == "params/fc/kernel/array/qvalue",
                                              lambda leaf: leaf.astype(jnp.int8).at[0, 0].set(100))).save(path)
    with pytest.raises(ValueError, match=re.escape("params/fc/kernel/array/qvalue holds 100, outside the range [-8, "
                                                   "7]")):
        quant.load_deployed(path, int4)
    # A file of the format before checksums.
    (tmp_path / "int8.npz").write_bytes(original)
    (tmp_path / "int8.npz.json").write_text(json.dumps({"format": "attrjax-deployed-1", "bits": 8, "arrays": 12}))
    with pytest.raises(ValueError, match="cannot be checked against checksums"):
        quant.load_deployed(path, quantized)


def test_calibration_refuses_inputs_that_would_give_a_dead_network(tiny):
    model, variables = tiny
    for images, message in ((jnp.zeros_like(IMAGES), "calibration batch 1 is constant"),
                            (jnp.full_like(IMAGES, jnp.nan), "calibration batch 1 holds non-finite values"),
                            (IMAGES.at[0, 0, 0, 0].set(jnp.inf), "calibration batch 1 holds non-finite values"),
                            (np.uint8(255) * (np.asarray(IMAGES) > 0), "batch 1: images must be fl.*uint8.*/ 255")):
        with pytest.raises(ValueError, match=message):
            quant.calibrate(model, variables, [IMAGES, images])
    # conv1 outputs relu(-1) = 0 everywhere: the block's input range is zero, whatever the images.
    dead = _replace_leaves(variables, lambda name, _: name.startswith("params/conv1/"),
                           lambda leaf: jnp.zeros_like(leaf) if leaf.ndim > 1 else jnp.full_like(leaf, -1.0))
    with pytest.raises(ValueError, match=r"zero or non-finite activation ranges.*\n  block/conv_general_dilated0_lhs: "
                                         r"\[0.0\]"):
        quant.calibrate(model, dead, [IMAGES])


def test_a_refused_quantization_rerun_leaves_every_deployed_network_as_it_was(tiny, tmp_path, monkeypatch):
    """Through experiments.quantize (post-training quantization of a stand-in teacher, nothing trained): a rerun
    with other bits is refused before anything is written; with on_config_change=restart the old run, its deployed
    network included, is set aside."""
    model, variables = tiny
    monkeypatch.setattr(runs, "load_teacher", lambda config, workdir: (model, variables))
    workdir = str(tmp_path)
    bind_run_config(runs.checkpoint_dir(runs.TEACHER, workdir), {"teacher": "a stand-in"})
    settings = ["data.image_size=12", "data.batch_size=6", "quantization.calibration_images=6", "runs=quantized"]
    images = np.asarray(jax.random.randint(jax.random.key(6), (6, 12, 12, 3), 0, 256), np.uint8)
    splits = {"train": {"image": images, "mask": np.zeros((6, 12, 12), np.uint8), "labels": np.eye(6, dtype=bool)}}
    quantize.run(configuration.load_config("quick", settings), workdir, splits)
    run = tmp_path / quantize.PTQ
    written = {name: (run / name).read_bytes() for name in ("deployed.npz", "deployed.npz.json", "run_config.json")}
    assert json.loads(written["run_config.json"])["config"]["settings"] == {"setting": "ptq", "bits": 8,
                                                                             "calibration_images": 6}
    int4 = configuration.load_config("quick", settings + ["quantization.bits=4"])
    with pytest.raises(RunConfigMismatchError, match="settings.bits: 8 -> 4"):
        quantize.run(int4, workdir, splits)
    assert {name: (run / name).read_bytes() for name in written} == written
    with pytest.raises(RunConfigMismatchError, match="settings.bits: 8 -> 4"):  # nor is it evaluated as int4
        quantize.load(quantize.PTQ, quantize.quantization_runs(int4)[quantize.PTQ], int4, workdir, None, variables)
    quantize.run(configuration.load_config("quick", settings + ["quantization.bits=4", "on_config_change=restart"]),
                 workdir, splits)
    aside, = tmp_path.glob(f"{quantize.PTQ}.replaced-*")
    assert {name: (aside / name).read_bytes() for name in written} == written
    assert json.loads((run / "deployed.npz.json").read_text())["bits"] == 4


def _stats_paths(quantized) -> list[str]:
    return sorted("/".join(str(key.key) for key in path[:-1])
                  for path, _ in jax.tree_util.tree_flatten_with_path(quantized.quant_stats)[0])


def test_a_vit_s_attention_einsums_are_quantized_the_same_every_time():
    """A linen ViT's attention (``Q Kᵀ`` and ``A V`` through ``jnp.einsum``) is quantized on both operands, with
    ranges calibrated the same in every call (``jnp.einsum``'s cached trace once hid it after the first), and the
    deployed integer network computes the fake-quantized model's logits."""
    from attrjax.models import ViT

    vit = ViT(num_classes=3, image_size=16, patch=4, width=16, depth=1, num_heads=2, mlp_dim=32)
    images = draws.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = vit.init(jax.random.key(1), images)
    first, second = (quant.calibrate(vit, variables, [images], quant.Quantization(8)) for _ in range(2))
    assert {"block0/einsum0_lhs", "block0/einsum0_rhs", "block0/einsum1_lhs", "block0/einsum1_rhs"} <= set(
        _stats_paths(first))
    chex.assert_trees_all_equal(first.quant_stats, second.quant_stats)
    fake_quantized = first.apply(variables, images)[0]
    np.testing.assert_allclose(quant.deploy(first, variables).apply(images), fake_quantized, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(fake_quantized - vit.apply(variables, images)).max()) > 1e-4  # the einsums are quantized


def test_calibration_runs_in_eval_mode_whatever_the_module_s_default():
    class TrainByDefault(nn.Module):  # flax's ImageNet ResNet's convention: train defaults to True
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Conv(4, (3, 3))(x)))  # no rng: fails in train mode
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    model = TrainByDefault()
    images = draws.normal(jax.random.key(2), (4, 8, 8, 3))
    variables = model.init(jax.random.key(3), images, train=False)
    quantized = quant.calibrate(model, variables, [images], quant.Quantization(8))
    np.testing.assert_allclose(quantized.apply(variables, images)[0], model.apply(variables, images, train=False),
                               rtol=0.1, atol=0.1)
