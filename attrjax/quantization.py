"""Quantized networks (int8 or int4 weights and activations) through qwix, for post-training quantization (PTQ) and
quantization-aware training (QAT) of any Flax linen classifier (docs/method.md#quantization).

What is quantized: every convolution and dense layer (the ops qwix intercepts), its weights symmetrically per output
channel (``scale = max |W| / (2^(b-1) - 0.5)``, ``q = round(W / scale)``) and its input per tensor with a *static*
scale: the mean over calibration images of each image's ``max |x|``, over the same bound, so larger values saturate
(at -128 / 127 for int8). Biases and BatchNorm stay in float32 (hardware folds them into the int32 accumulator's
rescale).

Two views of one quantized network:
- ``QuantizedModel`` (from ``calibrate``): a split model whose forward pass computes the quantized network's values in
  float arithmetic (each quantized operand is ``dequantize(quantize(x))``), so it trains (QAT), attributes and
  propagates like any other model. Its derivatives use the straight-through estimator at every order: each quantizer
  differentiates as the identity, so the gradient of the logits at a layer is that of the deployed network with its
  quantized weights, and the matching loss's double backprop differentiates that gradient through the quantized
  weights as if they were their float shadows (qwix's own QAT provider defines the estimator for the first
  derivative only: through its convolution's backward pass a second derivative reaches the weights through their
  scales alone).
- ``DeployedModel`` (from ``deploy``): qwix's PTQ model, integer weights stored as int8/int4 and integer arithmetic,
  what a device runs and stores; it computes the same logits (tested) and has ``nbytes``, ``save`` and
  ``load_deployed``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import zipfile
from typing import Any, Iterable, Mapping, Sequence, cast

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src import averaging
from qwix._src.core import conv_general as qwix_conv
from qwix._src.core import dot_general as qwix_dot
from qwix._src.core import einsum as qwix_einsum
from qwix._src.core import qarray
from qwix._src.utils import flax_util

from attrjax._files import write_bytes, write_json
from attrjax.models._adapters import as_split_model
from attrjax.models._split import (LayerDescription, LinenSplitModel, Linearization, SplitModel, Variables,
                                   check_images)
from attrjax._paths import path_name
from attrjax.pruning._counting import storage_bytes

BITS = {8: jnp.int8, 4: jnp.int4}
"""The supported bit widths and the integer type each stores its weights as."""
QUANT_STATS = "quant_stats"  # the collection of the calibrated activation ranges
DEPLOYED_FORMAT = "attrjax-deployed-2"  # the metadata of DeployedModel.save: bit width, each array's SHA-256
# The methods of a linen module that run layers (attrjax's VGG splits through features/head).
_METHODS = ("__call__", "features", "head")


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How to quantize: ``bits`` 8 or 4, for the weights (per output channel) and the inputs of every conv and dense
    layer (per tensor, static range) alike, as qwix's integer convolution multiplies operands of one width."""

    bits: int = 8

    def __post_init__(self):
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"quantization bits must be one of {sorted(BITS)}, got {self.bits!r}")

    def rules(self) -> list[qwix.QuantizationRule]:
        """qwix's rules: every conv and dense layer, weights and inputs at ``bits``, inputs with static scales."""
        qtype = BITS[self.bits]
        return [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, act_qtype=qtype, act_static_scale=True)]

    @property
    def name(self) -> str:
        return f"int{self.bits}"


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _straight_through(x: jax.Array, scale: jax.Array, zero_point, qtype) -> jax.Array:
    """``dequantize(quantize(x))`` on qwix's grid; differentiates as the identity in ``x`` at every order."""
    return qarray.dequantize(qarray.quantize_with_scale_zero_point(x, qtype, scale, zero_point))


@_straight_through.defjvp
def _straight_through_jvp(qtype, primals, tangents):
    x, scale, zero_point = primals
    return _straight_through(x, scale, zero_point, qtype), tangents[0]


class StraightThroughProvider(qwix.QtProvider):
    """qwix's QAT interception and calibration with float fake quantization whose derivative is the identity at every
    order (see the module docstring for why not qwix's integer custom VJP)."""

    def _fake_quant(self, x: jax.Array, how: qarray.HowToQuantize, rule, stat_name: str | None) -> jax.Array:
        batch_axes = tuple(rule.act_batch_axes)
        if stat_name is None:  # weights, or dynamic-range activations
            calibration = qarray.calibrate(x, how)
        elif flax_util.should_update_quant_stats():  # calibrating
            calibration = self._update_and_get_quant_stat(stat_name, batch_axes, qarray.calibrate(x, how))
        else:  # the stored range only, so that the forward pass reads no statistic of x
            average = averaging.SimpleMovingAverage()
            stat = flax_util.get_or_create_variable(QUANT_STATS, stat_name, lambda: average.init(jax.tree.map(
                lambda v: v.mean(axis=batch_axes, keepdims=True), qarray.calibrate(x, how))))
            calibration = average.get_calibration(stat.value)
        scale, zero_point = jax.lax.stop_gradient(qarray.compute_scale_zero_point(calibration, how.qtype))
        return _straight_through(x, scale, zero_point, how.qtype)

    def _operand(self, x, rule, op_id: str, side: str, how_fn) -> jax.Array:
        if flax_util.find_param(x) is not None:
            return self._fake_quant(x, how_fn(qtype=rule.weight_qtype,
                                              calibration_method=rule.weight_calibration_method), rule, None)
        if rule.act_qtype is None:
            return x
        return self._fake_quant(x, how_fn(qtype=rule.act_qtype, calibration_method=rule.act_calibration_method),
                                rule, f"{op_id}_{side}" if rule.act_static_scale else None)

    def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                             preferred_element_type=None, out_sharding=None):
        rule, op_id = self._get_current_rule_and_op_id("conv_general_dilated")
        if rule is not None and rule.weight_qtype is not None:
            dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            lhs = self._operand(lhs, rule, op_id, "lhs", functools.partial(
                qwix_conv.get_how_to_quantize, dimension_numbers=dims, for_lhs=True))
            rhs = self._operand(rhs, rule, op_id, "rhs", functools.partial(
                qwix_conv.get_how_to_quantize, dimension_numbers=dims, for_lhs=False))
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding)

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                    out_sharding=None):
        rule, op_id = self._get_current_rule_and_op_id("dot_general")
        if rule is not None and rule.weight_qtype is not None:
            ndims = (lhs.ndim, rhs.ndim)
            how = functools.partial(qwix_dot.get_how_to_quantize, dimension_numbers=dimension_numbers, ndims=ndims,
                                    tile_size=None)
            lhs = self._operand(lhs, rule, op_id, "lhs", functools.partial(how, for_lhs=True))
            rhs = self._operand(rhs, rule, op_id, "rhs", functools.partial(how, for_lhs=False))
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)

    def einsum(self, einsum_str, *operands, precision=None, preferred_element_type=None,
               _dot_general=jax.lax.dot_general, out_sharding=None):
        """Both operands of a two-operand einsum quantized in the einsum's own layout and under its own name
        (``einsum0``), as qwix's PTQ quantizes them (weights and activations alike: a dense kernel, attention's
        ``Q Kᵀ`` and ``A V``), then the einsum of the quantized values. Quantizing before ``jnp.einsum`` rather than
        inside it matters: ``jnp.einsum`` is a jitted function whose trace JAX caches, so an interception inside it
        would act on its first trace only."""
        rule, op_id = self._get_current_rule_and_op_id("einsum")
        if rule is not None and rule.weight_qtype is not None and len(operands) == 2:
            lhs, rhs = operands
            how = functools.partial(qwix_einsum.get_how_to_quantize, einsum_str=einsum_str,
                                    ndims=(lhs.ndim, rhs.ndim), tile_size=None)
            operands = (self._operand(lhs, rule, op_id, "lhs", functools.partial(how, for_lhs=True)),
                        self._operand(rhs, rule, op_id, "rhs", functools.partial(how, for_lhs=False)))
        return jnp.einsum(einsum_str, *operands, precision=precision, preferred_element_type=preferred_element_type,
                          _dot_general=_dot_general, out_sharding=out_sharding)

    def get_intercept_map(self):
        intercept_map = super().get_intercept_map()
        del intercept_map["jax.lax.ragged_dot"]
        return intercept_map


def _check_linen(model) -> nn.Module:
    if isinstance(model, QuantizedModel):
        raise ValueError("the model is quantized already; quantize its float model (QuantizedModel.model)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"attrjax quantizes Flax linen modules (through qwix's interception), got "
                        f"{type(model).__name__}")
    return model


def _quantized_module(model: nn.Module, provider: qwix.QuantizationProvider) -> nn.Module:
    methods = tuple(name for name in _METHODS if callable(getattr(type(model), name, None)))
    return qwix.quantize_model(model, provider, methods=methods)


def _float_variables(variables: Variables) -> Variables:
    """``variables`` as JAX arrays: qwix tells weights from activations by finding the very array a layer read
    among its parameters, which a NumPy parameter (converted inside the layer) would defeat."""
    if QUANT_STATS in variables:
        raise ValueError(f"these variables carry a '{QUANT_STATS}' collection: a QuantizedModel takes the float "
                         "model's variables (params, batch_stats) and holds its calibrated ranges itself")
    return jax.tree.map(jnp.asarray, variables)


def _uncalibrated(quant_stats) -> list[str]:
    flat = flax.traverse_util.flatten_dict(quant_stats) if quant_stats else {}
    return sorted("/".join(path[:-1]) for path, value in flat.items() if path[-1] == "count" and int(value) == 0)


def _dead_ranges(quant_stats) -> list[str]:
    """``"<quantizer path>: <range>"`` for every calibrated activation range (qwix's running mean of each
    calibration image's max |x|) that is zero or not finite: its quantizer maps every input to 0 or NaN."""
    flat = flax.traverse_util.flatten_dict(quant_stats) if quant_stats else {}
    dead = []
    for path, total in sorted(flat.items()):
        if path[-1].startswith("sum_of_"):
            value = np.asarray(total, np.float64) / int(flat[path[:-1] + ("count",)])
            if not (np.all(np.isfinite(value)) and np.all(value != 0)):
                dead.append(f"{'/'.join(path[:-1])}: {value.ravel().tolist()}")
    return dead


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel(SplitModel):
    """A float linen classifier with quantized convs and dense layers (see the module docstring); a split model, so
    it trains, evaluates and attributes like any other. Its variables are the float model's (``params``,
    ``batch_stats``): QAT trains the float weights behind the quantizers. Build it with ``calibrate``.

    Attributes:
      model: the float linen module.
      quantization: the bit width.
      quant_stats: the calibrated activation ranges (qwix's ``quant_stats`` collection).
      example_images: images (B,S,S,3) of the size the model takes.
    """

    model: nn.Module
    quantization: Quantization
    quant_stats: Any
    example_images: jax.Array

    def __post_init__(self):
        missing = _uncalibrated(self.quant_stats)
        if missing:
            raise ValueError(f"the activation ranges of {', '.join(missing)} were never calibrated; build the "
                             "model with attrjax.quantization.calibrate")
        dead = _dead_ranges(self.quant_stats)
        if dead:
            raise ValueError("calibration gave zero or non-finite activation ranges (quantizer: range), so the "
                             "quantized network would compute nothing (or NaN) there:\n  " + "\n  ".join(dead)
                             + "\nCalibrate on the normalised training images the float model computes finite, "
                             "varied activations on, and check that its variables are finite")

    @functools.cached_property
    def module(self) -> nn.Module:
        return _quantized_module(_check_linen(self.model), StraightThroughProvider(self.quantization.rules()))

    @functools.cached_property
    def _inner(self) -> SplitModel:
        return as_split_model(self.module, self.example_images)

    def _with_ranges(self, variables: Variables) -> Variables:
        return {**_float_variables(variables), QUANT_STATS: self.quant_stats}

    @property
    def layers(self) -> tuple[str, ...]:
        return self._inner.layers

    @property
    def not_feature_maps(self) -> Mapping[str, str]:
        return self._inner.not_feature_maps

    def describe_layers(self, example_images: jax.Array) -> tuple[LayerDescription, ...]:
        return self._inner.describe_layers(example_images)

    def init(self, rng, images):
        return {name: value for name, value in self._inner.init(rng, images).items() if name != QUANT_STATS}

    def apply(self, variables, images, *, train=False, rng=None):
        return self._inner.apply(self._with_ranges(variables), images, train=train, rng=rng)

    def apply_perturbed(self, variables, images, perturbations, *, train=False, rng=None):
        return self._inner.apply_perturbed(self._with_ranges(variables), images, perturbations, train=train, rng=rng)

    def linearize_layers(self, variables, images, layers, *, train=False, rng=None) -> Linearization:
        return self._inner.linearize_layers(self._with_ranges(variables), images, layers, train=train, rng=rng)


def _check_calibration_batch(batch: jax.Array, index: int) -> None:
    """Raises ValueError unless ``batch`` is (B,S,S,C) with B >= 1, floating point, finite and not constant."""
    if batch.ndim != 4 or not len(batch):
        raise ValueError(f"calibration batches must be images (B,S,S,C) with B >= 1, got shape {batch.shape}")
    check_images(batch, f"calibration batch {index}")
    low, high = float(jnp.min(batch)), float(jnp.max(batch))  # NaN and inf reach both
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"calibration batch {index} holds non-finite values (min {low}, max {high}): calibrate on "
                         "finite, normalised training images")
    if low == high:
        raise ValueError(f"calibration batch {index} is constant (every value is {low}): ranges calibrated on it "
                         "would be zero; calibrate on real, normalised training images")


def calibrate(model: nn.Module, variables: Variables, images: Iterable[jax.Array],
              quantization: Quantization = Quantization()) -> QuantizedModel:
    """The quantized ``model`` with activation ranges calibrated on ``images`` (an iterable of (B,S,S,3) batches,
    e.g. training images), run through the float weights in eval mode (``train=False`` for a module whose
    ``__call__`` has a ``train`` keyword, whatever its default).

    Raises ValueError when ``images`` yields no batch; when a batch is not floating point (e.g. uint8 images not yet
    normalised), holds a NaN or inf, or is constant; and when a calibrated range comes out zero or non-finite
    (naming its quantizer)."""
    model = _check_linen(model)
    variables = _float_variables(variables)
    module = _quantized_module(model, StraightThroughProvider(quantization.rules()))
    stats, example = None, None

    mode: dict = {}

    @jax.jit
    def update(variables, stats, batch):
        _, updated = module.apply({**variables, QUANT_STATS: stats}, batch, mutable=[QUANT_STATS], **mode)
        return updated[QUANT_STATS]

    for index, batch in enumerate(images):
        batch = jnp.asarray(batch)
        _check_calibration_batch(batch, index)
        if stats is None:
            example = batch[:1]
            mode = LinenSplitModel(model, example)._mode(False)  # the eval mode its split model applies it in
            stats = jax.jit(lambda images: module.init(jax.random.key(0), images, **mode)[QUANT_STATS])(example)
        stats = update(variables, stats, batch)
    if example is None:
        raise ValueError("calibration needs at least one batch of images (e.g. a few hundred training images)")
    return QuantizedModel(model, quantization, jax.device_get(stats), example)


def _ptq_module(quantized: QuantizedModel) -> nn.Module:
    return _quantized_module(quantized.model, qwix.PtqProvider(quantized.quantization.rules()))


def _ptq_template(quantized: QuantizedModel):
    return jax.eval_shape(_ptq_module(quantized).init, jax.random.key(0), quantized.example_images)["params"]


@dataclasses.dataclass(frozen=True, eq=False)
class DeployedModel:
    """The integer network a device runs: qwix's PTQ model with int8/int4 weights (and static activation scales).

    Attributes:
      quantized: the ``QuantizedModel`` it was deployed from (its float model, bit widths and ranges).
      variables: ``{"params": quantized params, "batch_stats": ...}``.
    """

    quantized: QuantizedModel
    variables: Variables

    @functools.cached_property
    def module(self) -> nn.Module:
        return _ptq_module(self.quantized)

    def apply(self, images: jax.Array) -> jax.Array:
        """Logits (B,K) of images (B,S,S,3), eval mode, in integer arithmetic."""
        if self.quantized.quantization.bits == 4 and jax.default_backend() == "cpu":
            raise NotImplementedError("XLA's CPU backend has no int4 convolution; QuantizedModel.apply computes the "
                                      "same network in float arithmetic")
        return cast(jax.Array, self.module.apply(self.variables, images))

    @property
    def nbytes(self) -> int:
        """Bytes of every array the forward pass reads (``attrjax.pruning.storage_bytes``)."""
        return storage_bytes(self.variables)

    def save(self, path: str) -> None:
        """Writes ``path`` (.npz: every array, int4 stored as int8), then ``path`` + ``.json`` (the format, the bit
        width and each array's dtype, shape and SHA-256), each atomically: a reader sees whole files, and a pair
        that a crash left half-replaced fails ``load_deployed``'s checksums."""
        leaves = jax.tree.leaves(jax.device_get(self.variables))
        arrays: dict[str, Any] = {f"{index:05d}": np.asarray(leaf.astype(jnp.int8) if leaf.dtype == jnp.int4 else leaf)
                                  for index, leaf in enumerate(leaves)}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(path, buffer.getvalue())
        write_json(path + ".json", {"format": DEPLOYED_FORMAT, **dataclasses.asdict(self.quantized.quantization),
                                    "arrays": {key: _array_record(array) for key, array in arrays.items()}})


def _array_record(array: np.ndarray) -> dict:
    """``{"dtype", "shape", "sha256"}`` of an array as stored: the SHA-256 of its bytes in C order."""
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}


def deploy(quantized: QuantizedModel, variables: Variables) -> DeployedModel:
    """The integer network of ``quantized`` with float ``variables``: weights quantized once (qwix's
    ``quantize_params``), activation scales from the calibrated ranges."""
    variables = _float_variables(variables)
    params = qwix.quantize_params(variables["params"], _ptq_template(quantized),
                                  jax.tree.map(jnp.asarray, quantized.quant_stats))
    return DeployedModel(quantized, {**variables, "params": params})


_REWRITE = "rewrite it with DeployedModel.save (in the experiments: rerun experiments.quantize)"


def _read_metadata(path: str) -> dict:
    """The metadata ``DeployedModel.save`` wrote beside ``path``; raises ValueError when it is missing, damaged or
    of an older format (without checksums)."""
    meta_path = path + ".json"
    if not os.path.exists(meta_path):
        raise ValueError(f"{path} has no {os.path.basename(meta_path)}: it is not a deployed quantized network "
                         "(DeployedModel.save writes both)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as error:
        raise ValueError(f"{meta_path} is damaged ({error}); {_REWRITE}") from error
    if not isinstance(meta, dict) or meta.get("format") != DEPLOYED_FORMAT or not isinstance(meta.get("arrays"), dict):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path} is not of format {DEPLOYED_FORMAT} (it says {found!r}), so the arrays of "
                         f"{path} cannot be checked against checksums; {_REWRITE}")
    return meta


def _read_arrays(path: str, records: dict) -> dict[str, np.ndarray]:
    """The arrays of the .npz ``path`` by name, each equal to its entry of ``records`` (``_array_record``: dtype,
    shape, SHA-256); raises ValueError naming ``path`` when it cannot be read or differs from them."""
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is damaged and cannot be read ({error}); {_REWRITE}") from error
    if sorted(arrays) != sorted(records):
        raise ValueError(f"{path} holds arrays {sorted(arrays)}, but {path}.json lists {sorted(records)}: one of "
                         f"the two was replaced; {_REWRITE}")
    for key, array in arrays.items():
        if _array_record(array) != records[key]:
            raise ValueError(f"{path}: array {key} does not match its checksum (SHA-256, dtype and shape) in "
                             f"{path}.json: the file was changed or damaged after it was saved; {_REWRITE}")
    return arrays


def _check_values(path: str, name: str, array: np.ndarray, dtype) -> None:
    """Raises ValueError naming leaf ``name`` unless ``array`` (the stored form of a leaf of ``dtype``) is finite
    when ``dtype`` is a float, and within ``dtype``'s range when it is an integer (int4, stored as int8: [-8, 7])."""
    if jnp.issubdtype(dtype, jnp.floating) and not np.all(np.isfinite(array)):
        raise ValueError(f"{path}: {name} holds {np.sum(~np.isfinite(array))} non-finite values (NaN or inf); a "
                         "deployed network must be finite: deploy it again from finite variables")
    if jnp.issubdtype(dtype, jnp.integer) and array.size:
        info = jnp.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise ValueError(f"{path}: {name} holds {low if low < info.min else high}, outside the range "
                             f"[{info.min}, {info.max}] of its {jnp.dtype(dtype).name} weights; {_REWRITE}")


def load_deployed(path: str, quantized: QuantizedModel) -> DeployedModel:
    """A ``DeployedModel`` that ``DeployedModel.save`` wrote, for the architecture and bit widths of ``quantized``.

    Raises ValueError when the file holds another kind of network (a float checkpoint, other bit widths, another
    architecture), was written by an older attrjax (no checksums), differs from the checksums saved with it, or
    holds a NaN or inf, or an integer outside its bit width (naming the file, and the leaf for the last two)."""
    meta = _read_metadata(path)
    saved = Quantization(meta["bits"])
    if saved != quantized.quantization:
        raise ValueError(f"{path} holds a {saved.name} network, but the model is {quantized.quantization.name}")
    arrays = _read_arrays(path, meta["arrays"])
    fresh = jax.jit(quantized.init)(jax.random.key(0), quantized.example_images)
    template = deploy(quantized, fresh).variables  # (qwix's PTQ conversion needs concrete ranges)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(arrays) != len(leaves):
        raise ValueError(f"{path} holds {len(arrays)} arrays, this architecture's deployed network {len(leaves)}: it "
                         "was saved from another architecture")
    loaded = []
    for key, (leaf_path, spec) in zip(sorted(arrays), leaves):
        array = arrays[key]
        stored = jnp.int8 if spec.dtype == jnp.int4 else spec.dtype
        if array.shape != spec.shape or array.dtype != stored:
            raise ValueError(f"{path}: array {key} is {array.dtype}{list(array.shape)}, this architecture's "
                             f"deployed network needs {jnp.dtype(stored)}{list(spec.shape)}")
        _check_values(path, path_name(leaf_path), array, spec.dtype)
        loaded.append(jnp.asarray(array).astype(spec.dtype))
    return DeployedModel(quantized, jax.tree.unflatten(treedef, loaded))


def grid_values(quantized: QuantizedModel, variables: Variables) -> dict[str, jax.Array]:
    """The dequantized weights the quantized network computes with, by parameter path (``conv1_1/kernel``), each
    ``scale * q`` with integer ``q`` in the bit width's range."""
    deployed = deploy(quantized, variables).variables["params"]
    leaves = jax.tree_util.tree_flatten_with_path(deployed, is_leaf=lambda v: isinstance(v, qarray.QArray))[0]
    return {"/".join(str(key.key) for key in path if hasattr(key, "key")): qarray.dequantize(leaf)
            for path, leaf in leaves if isinstance(leaf, qarray.QArray)}


__all__: Sequence[str] = ["Quantization", "QuantizedModel", "DeployedModel", "StraightThroughProvider", "calibrate",
                          "deploy", "load_deployed", "grid_values", "BITS"]
