"""Any classifier as a *split model*: what attrjax needs from a network to attribute, match and train it, as pure
functions of explicit variables (so everything jits, vmaps and differentiates).

A split model gives
- ``layers``: the names of the layers it can be split at, in forward order;
- ``init(rng, images) -> variables``: fresh variables, a dict of collections (``params`` and state such as
  ``batch_stats``);
- ``apply(variables, images, *, train, rng) -> (logits (B,K), state)``: ``state`` holds the updated state
  collections in train mode (``{}`` in eval mode);
- ``linearize_layers(variables, images, layers, *, train, rng) -> Linearization``: one forward pass that returns the
  activations A (B,H,W,C) at each of ``layers``, the logits, the updated state, and ``vjp(cotangent (B,K))``, the
  gradients of ``cotangent . logits`` with respect to every A (one backward pass for all layers);
  ``linearize(..., layer)`` is the one-layer case. Grad-CAM, the matching loss and the train step need nothing
  else, and since ``vjp`` is a JAX function of the variables, ``jax.grad`` differentiates through it (double
  backprop).

A layer outputs a feature map (B,H,W,C) or a token sequence (B,T,D): ``prefix`` tokens (class, distillation,
register tokens) followed by an h x w grid of patch tokens, row-major (a Vision Transformer's blocks). A token layer
is presented as the map (B,h,w,D) of its patch tokens: that is its activations A, its gradients and the
perturbations ``apply_perturbed`` adds, so everything built on the protocol works on it unchanged; the prefix tokens
stay out of the map, but gradients flow through them. ``describe_layers`` lists each layer's kind and shapes and
the outputs that are not layers, with the reason (``format_layers`` as a Markdown table).

Adapters: ``LinenSplitModel`` wraps any Flax linen module without methods of its own (it finds the layers by
intercepting submodule calls, and takes the gradient at a layer through a zero perturbation of its output),
``NNXSplitModel`` does the same for a Flax NNX module, and ``FunctionalSplitModel`` takes plain ``features``/``head``
functions. The module adapters take ``token_grid=(h, w)`` for token sequences whose patch grid cannot be traced,
and ``output=`` for a model that returns more than its logits (a tuple, a dict, an output dataclass).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attrjax.models._layout import (BATCH, CHANNELS, IMAGE_AXES, MIXED, Axes, TokenGrid, describe, is_feature_map,
                                    token_sequence_grid, traced_axes)
from attrjax.models._layout import token_grid as tokens_axis_grid

Variables = Mapping[str, Any]
# Keywords that switch a linen module's training mode under another name than ``train`` (named in errors); the
# inverted ones are True in eval mode: as ``train_argument`` they get ``not train``.
_MODE_ARGUMENTS = ("training", "is_training", "train_mode")
_INVERTED_MODE_ARGUMENTS = ("deterministic", "use_running_average")
OutputSelector = Union[int, str, Callable[[Any], jax.Array]]
"""What picks the logits (B,K) out of what a model returns: an index (tuple, list), a key (dict) or attribute name
(an output dataclass), or a function ``out -> logits``."""
_LAYER_RANKS = (3, 4, 5)  # submodule outputs checked for being a layer (and listed with a reason when not)


class LayerLinearization(NamedTuple):
    """One forward pass of a split model, linearised at a layer."""

    activations: jax.Array  # A, (B,H,W,C): a feature map, or a token layer's patch tokens as (B,h,w,D)
    logits: jax.Array  # (B,K)
    vjp: Callable[[jax.Array], jax.Array]  # cotangent (B,K) -> d(cotangent . logits)/dA (B,H,W,C)
    state: Variables  # updated state collections (train mode), else {}


class Linearization(NamedTuple):
    """One forward pass of a split model, linearised at several layers at once."""

    activations: dict[str, jax.Array]  # layer -> A (B,H,W,C) (a token layer's patch tokens as (B,h,w,D))
    logits: jax.Array  # (B,K)
    vjp: Callable[[jax.Array], dict[str, jax.Array]]  # cotangent (B,K) -> layer -> d(cotangent . logits)/dA
    state: Variables  # updated state collections (train mode), else {}


class LayerDescription(NamedTuple):
    """One submodule output of a split model: a layer, or an output that is not one (kind ``"refused"``)."""

    name: str  # the layer (module path)
    kind: str  # "map": a feature map (B,H,W,C); "tokens": a token sequence (B,T,D); "refused": neither
    output_shape: tuple[int, ...] | None  # what the submodule outputs (the array of a tuple output); None: unknown
    map_shape: tuple[int, ...] | None  # (B,h,w,D): the activations A at the layer; None when refused
    prefix_tokens: int  # tokens before the patch grid (class, registers); 0 unless kind is "tokens"
    grid: tuple[int, int] | None  # (h, w) of the patch tokens, row-major; None unless kind is "tokens"
    reason: str  # why the output is not a layer; "" for a layer


class SplitModel(abc.ABC):
    """The protocol; see the module docstring."""

    @property
    @abc.abstractmethod
    def layers(self) -> tuple[str, ...]:
        """Layer names in forward order."""

    @abc.abstractmethod
    def init(self, rng: jax.Array, images: jax.Array) -> Variables:
        """Fresh variables for images (B,S,S,3)."""

    @abc.abstractmethod
    def apply(self, variables: Variables, images: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None) -> tuple[jax.Array, Variables]:
        """``(logits (B,K), updated state)``; ``rng`` feeds dropout when training."""

    @abc.abstractmethod
    def linearize_layers(self, variables: Variables, images: jax.Array, layers: Sequence[str], *,
                         train: bool = False, rng: jax.Array | None = None) -> Linearization:
        """The forward pass linearised at every one of ``layers`` (see ``Linearization``)."""

    def apply_perturbed(self, variables: Variables, images: jax.Array, perturbations: dict[str, jax.Array], *,
                        train: bool = False, rng: jax.Array | None = None) -> tuple[jax.Array, Variables]:
        """``(logits, state)`` of a forward pass that adds ``perturbations[layer]`` (B,H,W,C) to each named layer's
        output (to the patch tokens of a token layer, as their (B,h,w,D) map). Propagation methods (LRP, Excitation
        Backprop, RAP) read relevance at a layer through it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement apply_perturbed, which reading relevance "
                                  "at a layer needs; read it at the input (layer='input')")

    def linearize(self, variables: Variables, images: jax.Array, layer: str, *, train: bool = False,
                  rng: jax.Array | None = None) -> LayerLinearization:
        """The forward pass linearised at ``layer`` (see ``LayerLinearization``)."""
        lin = self.linearize_layers(variables, images, (layer,), train=train, rng=rng)
        return LayerLinearization(lin.activations[layer], lin.logits, lambda cotangent: lin.vjp(cotangent)[layer],
                                  lin.state)

    @property
    def not_feature_maps(self) -> Mapping[str, str]:
        """Submodules whose output has rank 3 to 5 but is neither a feature map (B,H,W,C) nor a token sequence
        (B,T,D) with a patch grid, so they are not ``layers``: name -> why (``check_layer``'s error)."""
        return {}

    def check_layer(self, layer: str) -> None:
        """Raises ValueError unless ``layer`` is one of ``layers``: why it is not a layer, or the layers."""
        if layer in self.layers:
            return
        if layer in self.not_feature_maps:
            raise ValueError(self.not_feature_maps[layer])
        raise ValueError(f"unknown layer {layer!r}; this model has: {', '.join(self.layers)}")

    def check_layers(self, layers: Sequence[str]) -> tuple[str, ...]:
        """``layers`` without repeats, after ``check_layer`` on each; at least one is needed."""
        layers = tuple(dict.fromkeys(layers))
        if not layers:
            raise ValueError(f"name at least one layer to linearise at; this model has: {', '.join(self.layers)}")
        for layer in layers:
            self.check_layer(layer)
        return layers

    def activation_shape(self, variables: Variables, images: jax.Array, layer: str) -> tuple[int, ...]:
        """The (B,H,W,C) shape of the activations at ``layer`` for ``images``, (B,h,w,D) at a token layer (nothing
        is computed)."""
        return jax.eval_shape(lambda v, x: self.linearize(v, x, layer).activations, variables, images).shape

    def describe_layers(self, example_images: jax.Array) -> tuple[LayerDescription, ...]:
        """Each layer (a feature map) for images shaped like ``example_images`` (B,S,S,3), then each output in
        ``not_feature_maps`` with its reason; nothing is computed. The module adapters override this with what they
        trace: token layers and every output in forward order."""
        variables = jax.eval_shape(self.init, jax.random.key(0), example_images)
        maps = [(layer, self.activation_shape(variables, example_images, layer)) for layer in self.layers]
        return (tuple(LayerDescription(layer, "map", shape, shape, 0, None, "") for layer, shape in maps)
                + tuple(LayerDescription(name, "refused", None, None, 0, None, reason)
                        for name, reason in self.not_feature_maps.items()))


def check_images(images, where: str) -> None:
    """Raises ValueError unless ``images`` (B,S,S,3) are floating point: the normalised floats a network takes,
    never raw 8-bit pixels. Reads the dtype only (no transfer, no sync)."""
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: images must be floating point (normalised floats), got {dtype}; convert them, "
                         "e.g. images.astype(np.float32) / 255, then apply the dataset's normalisation (subtract its "
                         "mean, divide by its std)")


def format_layers(descriptions: Sequence[LayerDescription]) -> str:
    """``descriptions`` (from ``SplitModel.describe_layers``) as a Markdown table, one row per output."""

    def shape(dims) -> str:
        return "" if dims is None else f"(B, {', '.join(map(str, dims[1:]))})"

    rows = ["| layer | kind | output | map (B,h,w,D) | prefix tokens | grid | why not a layer |",
            "|---|---|---|---|---|---|---|"]
    for row in descriptions:
        grid = "" if row.grid is None else f"{row.grid[0]}x{row.grid[1]}"
        prefix = str(row.prefix_tokens) if row.kind == "tokens" else ""
        cells = (f"`{row.name}`", row.kind, shape(row.output_shape), shape(row.map_shape), prefix, grid,
                 row.reason.replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _describe_value(value, depth: int = 0) -> str:
    """``array (B,5)``, ``a tuple of 2 (array (B,5), dict)``: what a model returned, for error messages."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"array (B,{','.join(map(str, value.shape[1:]))})" if value.ndim else "array ()"
    if depth:
        return type(value).__name__
    if isinstance(value, (tuple, list)):
        return (f"a {type(value).__name__} of {len(value)} "
                f"({', '.join(_describe_value(item, 1) for item in value)})")
    if isinstance(value, Mapping):
        items = dict(value)
    elif dataclasses.is_dataclass(value):
        items = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    else:
        return f"a {type(value).__name__}"
    fields = ", ".join(f"{key!r}: {_describe_value(item, 1)}" for key, item in items.items())
    return f"a {type(value).__name__} {{{fields}}}"


def _is_logits(value) -> bool:
    return getattr(value, "ndim", None) == 2


def _suggested_output(out) -> str:
    """``output=0``, ``output='logits'``: a selector that would pick the logits out of ``out``, for the error."""
    found: list[int | str]
    if isinstance(out, (tuple, list)):
        found = [index for index, item in enumerate(out) if _is_logits(item)]
    elif isinstance(out, Mapping):
        found = ["logits"] if "logits" in out else [key for key, item in out.items() if _is_logits(item)]
    else:
        found = ["logits"] if hasattr(out, "logits") else []
    return f"output={found[0]!r}" if found else "output="


def _select_logits(out, output: OutputSelector | None, model_name: str) -> jax.Array:
    """The logits (B,K) among what a model returned: ``out`` itself when ``output`` is None, else ``out[output]``
    (an index or key), ``getattr(out, output)`` (an attribute name) or ``output(out)``. Raises ValueError, showing
    what the model returned, when ``out`` is not an array and no ``output`` is given, or when the selected output is
    not (B,K)."""
    if output is None:
        if hasattr(out, "shape"):
            return out
        raise ValueError(f"{model_name} returns {_describe_value(out)}, not logits (B,K); pass "
                         f"{_suggested_output(out)} to pick them: an index, a key or attribute name, or a function "
                         "out -> logits")
    try:
        if callable(output):
            logits = output(out)
        elif isinstance(out, (tuple, list, Mapping)):
            logits = out[output]  # type: ignore[index]  # (an index or key: what the container takes)
        else:
            logits = getattr(out, str(output))
    except (IndexError, KeyError, AttributeError, TypeError) as error:
        raise ValueError(f"output={output!r} does not pick anything out of what {model_name} returns, "
                         f"{_describe_value(out)}: {error!r}") from error
    if not _is_logits(logits):
        raise ValueError(f"output={output!r} picks {_describe_value(logits)} out of what {model_name} returns "
                         f"({_describe_value(out)}), not logits (B,K)")
    return logits


def _check_adapter_options(token_grid, output) -> None:
    """Raises ValueError unless ``token_grid`` is None or two positive ints and ``output`` an ``OutputSelector`` or
    None."""
    if token_grid is not None and not (isinstance(token_grid, (tuple, list)) and len(token_grid) == 2 and all(
            isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0 for size in token_grid)):
        raise ValueError(f"token_grid must be (h, w), the patch grid's height and width in tokens, got {token_grid!r}")
    if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str)) and not callable(output)):
        raise ValueError(f"output must be an index, a key or attribute name, or a function out -> logits, got "
                         f"{output!r}")


def _check_activations(layer: str, activations) -> None:
    if getattr(activations, "ndim", None) != 4 or not jnp.issubdtype(activations.dtype, jnp.floating):
        shape = getattr(activations, "shape", type(activations).__name__)
        raise ValueError(f"layer {layer!r} outputs {shape}, not activations (B,H,W,C); split at a layer that "
                         "returns one feature map")


@dataclasses.dataclass(frozen=True)
class FunctionalSplitModel(SplitModel):
    """A split model from plain functions.

    Attributes:
      init_fn: ``(rng, images) -> variables``.
      features_fn: ``(variables, images, layer, train, rng) -> (A (B,H,W,C), state)``.
      head_fn: ``(variables, A, layer, train, rng) -> (logits (B,K), state)``; it receives the variables with the
        state that ``features_fn`` returned, and returns the complete updated state.
      layer_names: the layers ``features_fn`` and ``head_fn`` can split at, in forward order.
    """

    init_fn: Callable[[jax.Array, jax.Array], Variables]
    features_fn: Callable[..., tuple[jax.Array, Variables]]
    head_fn: Callable[..., tuple[jax.Array, Variables]]
    layer_names: Sequence[str]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer_names)

    def init(self, rng, images):
        return self.init_fn(rng, images)

    def apply(self, variables, images, *, train=False, rng=None):
        activations, state = self.features_fn(variables, images, self.layers[-1], train, rng)
        return self.head_fn({**variables, **state}, activations, self.layers[-1], train, rng)

    def apply_perturbed(self, variables, images, perturbations, *, train=False, rng=None):
        """Features and head split the network at one layer, so one layer can be perturbed per pass."""
        if len(perturbations) != 1:
            raise ValueError(f"a FunctionalSplitModel perturbs one layer per pass, got {sorted(perturbations)}")
        ((layer, perturbation),) = perturbations.items()
        self.check_layer(layer)
        activations, state = self.features_fn(variables, images, layer, train, rng)
        return self.head_fn({**variables, **state}, activations + perturbation, layer, train, rng)

    def _linearize_one(self, variables, images, layer, train, rng):
        activations, state = self.features_fn(variables, images, layer, train, rng)
        _check_activations(layer, activations)
        inner = {**variables, **state}
        logits, vjp, state = jax.vjp(lambda a: self.head_fn(inner, a, layer, train, rng), activations, has_aux=True)
        return activations, logits, lambda cotangent: vjp(cotangent)[0], state

    def linearize_layers(self, variables, images, layers, *, train=False, rng=None):
        """Features and head split the network at one layer, so several layers cost one pass each; with the same
        variables, images and ``rng`` every pass computes the same logits and state, and the last pass's are kept."""
        layers = self.check_layers(layers)
        passes = {layer: self._linearize_one(variables, images, layer, train, rng) for layer in layers}
        _, logits, _, state = passes[layers[-1]]
        return Linearization({layer: out[0] for layer, out in passes.items()}, logits,
                             lambda cotangent: {layer: out[2](cotangent) for layer, out in passes.items()}, state)


def module_path(module: nn.Module) -> str:
    """A linen submodule's layer name: its path of attribute names joined with dots (e.g. ``layer4.1``)."""
    return ".".join(str(part) for part in module.path)


class _LayerView(NamedTuple):
    """Where a layer's map sits in its submodule's output, and how a perturbation of the map is added there."""

    name: str
    element: int | None  # the array's index in a tuple or list output; None: the output is the array
    tokens: TokenGrid | None  # the layout of a token sequence (B,T,D); None: a feature map (B,H,W,C)
    shape: tuple[int, ...]  # the array's shape, as traced on the example images

    def _array(self, out) -> jax.Array:
        return out if self.element is None else out[self.element]

    def read(self, out) -> jax.Array:
        """The layer's map (B,H,W,C) (the patch tokens of a token sequence as (B,h,w,D)) in the submodule's
        output."""
        x = self._array(out)
        if self.tokens is None:
            return x
        prefix, height, width = self.tokens
        if x.shape[1] != prefix + height * width:
            raise ValueError(f"layer {self.name!r} outputs {x.shape[1]} tokens, but {prefix} + {height}x{width} when "
                             "its layers were traced: pass example images of the size you attribute")
        return x[:, prefix:].reshape(x.shape[0], height, width, x.shape[-1])

    def perturbed(self, out, perturbation: jax.Array | None):
        """The submodule's output with ``perturbation`` (shaped like ``read(out)``) added to the map (None: as it
        is); the rest of a tuple output, and the prefix tokens, pass through."""
        if perturbation is None:
            return out
        x = self._array(out)
        if self.tokens is not None:  # the patch tokens; zeros for the prefix
            patches = perturbation.reshape(x.shape[0], -1, x.shape[-1])
            perturbation = jnp.pad(patches, ((0, 0), (self.tokens.prefix, 0), (0, 0)))
        if self.element is None:
            return x + perturbation
        items = list(out)
        items[self.element] = x + perturbation
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # a named tuple, or not


class _Layers(NamedTuple):
    names: tuple[str, ...]  # the submodules that output a feature map or a token sequence, in forward order
    views: dict[str, _LayerView]  # layer -> where its map is in the submodule's output
    not_feature_maps: dict[str, str]  # the other submodules with a rank 3 to 5 output -> why they are not layers
    descriptions: tuple[LayerDescription, ...]  # every one of them, in forward order


class _TracedLayersModel(SplitModel):
    """A split model whose layers are found by tracing one forward pass (``_trace_layers``, by each subclass: linen
    and NNX modules), computed once for its example images (``_traced_layers``)."""

    example_images: jax.Array
    token_grid: tuple[int, int] | None

    @abc.abstractmethod
    def _trace_layers(self, images: jax.Array) -> _Layers:
        """The layers and the refused outputs, from one traced forward pass on images shaped like ``images``."""

    @functools.cached_property
    def _traced_layers(self) -> _Layers:
        return self._trace_layers(self.example_images)

    @property
    def layers(self) -> tuple[str, ...]:
        """The submodules whose output is one feature map (B,H,W,C) or token sequence (B,T,D), in the order those
        outputs are computed (see ``_layers_of``)."""
        return self._traced_layers.names

    @property
    def not_feature_maps(self) -> Mapping[str, str]:
        return self._traced_layers.not_feature_maps

    def describe_layers(self, example_images: jax.Array) -> tuple[LayerDescription, ...]:
        """Every submodule output of rank 3 to 5 in forward order, for images shaped like ``example_images``: each
        layer (``"map"`` or ``"tokens"``) and each output that is not one (``"refused"``, with the reason)."""
        return self._trace_layers(example_images).descriptions

    def _observed(self, layers: Sequence[str], perturbations: Mapping[str, jax.Array | None] | None):
        """``(observe(name, output) -> output, {layer: [its maps]})``: ``observe`` records each of ``layers``'
        maps and returns its output with the perturbation (if any) added."""
        views = self._traced_layers.views
        outputs: dict[str, list[jax.Array]] = {layer: [] for layer in layers}

        def observe(name: str, out):
            outputs[name].append(views[name].read(out))
            return views[name].perturbed(out, None if perturbations is None else perturbations[name])

        return observe, outputs


def _layer_candidates(out) -> list[tuple[int | None, jax.Array]]:
    """The arrays of a submodule's output that could be a layer: ``[(None, out)]`` for an array of rank 3 to 5, or
    ``[(index, array)]`` for each such array in a tuple or list output."""
    if getattr(out, "ndim", None) in _LAYER_RANKS:
        return [(None, out)]
    if isinstance(out, (tuple, list)):
        return [(index, item) for index, item in enumerate(out) if getattr(item, "ndim", None) in _LAYER_RANKS]
    return []


class _NotALayer(Exception):
    """Why an output is not a layer (the message)."""


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"(B, {', '.join(map(str, shape[1:]))})"


def _layout_of(what: str, shape: tuple[int, ...], axes: Axes, declared: tuple[int, int] | None) -> TokenGrid | None:
    """The layout of an output (``what``: ``layer 'name'`` in messages) with these traced axes: None for a feature
    map (B,H,W,C), the token layout of a token sequence (B,T,D) (traced, or from the ``declared`` token grid when
    its tokens axis could not be traced). Raises ``_NotALayer`` when it is neither."""
    if is_feature_map(axes):
        return None
    inferred = token_sequence_grid(axes)
    if inferred is not None:
        if declared is not None and tuple(declared) != inferred[1:]:
            raise _NotALayer(f"{what} outputs tokens {_shape_text(shape)} whose patch grid, traced from the images, "
                             f"is {inferred.height}x{inferred.width} after {inferred.prefix} prefix tokens, but "
                             f"token_grid={tuple(declared)} was declared; declare token_grid={inferred[1:]} or none")
        return inferred
    sequence = axes is not None and len(axes) == 3 and axes == (BATCH, MIXED, CHANNELS)
    if sequence and declared is not None:
        height, width = declared
        if shape[1] < height * width:
            raise _NotALayer(f"{what} outputs {shape[1]} tokens {_shape_text(shape)}, fewer than the {height * width} "
                             f"patch tokens of the declared token_grid={tuple(declared)}; declare the grid of its "
                             "patch tokens")
        return TokenGrid(shape[1] - height * width, height, width)
    header = (f"{what} outputs {_shape_text(shape)} with axes {describe(axes)}, not a feature map "
              f"{describe(IMAGE_AXES)} nor a token sequence (batch, tokens, channels)")
    if sequence:
        raise _NotALayer(f"{header}: its tokens axis has no patch grid attrjax can trace from the images (a gather, a "
                         "token after the grid, an op it does not follow). If its last h*w tokens are an h x w grid of "
                         "patch tokens, row-major, declare it: token_grid=(h, w) (the tokens before them are prefix "
                         "tokens)")
    if axes is not None and any(tokens_axis_grid(label) for label in axes):
        hint = ("It has a tokens axis: per-head attention projections (B,T,heads,head_dim) and attention scores "
                "(B,heads,T,T) are not token sequences; split at the attention's output projection or at a block's "
                "output")
    else:
        hint = ("Split at a layer that keeps the images' layout (a convolution, or a normalisation or activation "
                "after one) or at a transformer block's output; transpose a channels-first output to channels-last "
                "in the model; per-head attention projections and attention scores are neither")
    raise _NotALayer(f"{header}: its axes, traced from the images through the network, are neither the images' "
                     "batch, height and width with channels last nor the batch, the patch tokens and channels, so a "
                     f"map of it would be read along the wrong axes. {hint}")


def _call_view(name: str, candidates: list[tuple[int | None, tuple[int, ...], Axes]],
               declared: tuple[int, int] | None) -> _LayerView:
    """Where the layer is in one call's output: the array itself, or the one array of a tuple output that is a map
    or a token sequence. Raises ``_NotALayer``."""
    if candidates[0][0] is None:
        _, shape, axes = candidates[0]
        return _LayerView(name, None, _layout_of(f"layer {name!r}", shape, axes, declared), shape)
    found, refusals = [], []
    for element, shape, axes in candidates:
        try:
            found.append(_LayerView(name, element, _layout_of(f"element {element}", shape, axes, declared), shape))
        except _NotALayer as refusal:
            refusals.append(str(refusal))
    if len(found) == 1:
        return found[0]
    if found:
        raise _NotALayer(f"layer {name!r} returns a tuple with several maps or token sequences (elements "
                         f"{', '.join(str(view.element) for view in found)}); split at a submodule that returns one")
    raise _NotALayer(f"layer {name!r} returns a tuple without a map or token sequence: " + "; ".join(refusals))


def _layers_of(forward: Callable, images: jax.Array, variables: Variables,
               calls: list[tuple[str, list[tuple[int | None, jax.Array]]]],
               token_grid: tuple[int, int] | None) -> _Layers:
    """The layers of a network: ``forward(images (B,S,S,3), variables) -> outputs`` runs it once, appending
    ``(submodule name, _layer_candidates(its output))`` to ``calls`` for every submodule call and returning the
    candidates' arrays, in order. A submodule is a layer when every call of it outputs a feature map or a token
    sequence (or a tuple with exactly one array that is one): its axes, traced from the images through the network's
    jaxpr (``traced_axes``), are the images' batch, height and width and, last, channels; or the batch, a tokens
    axis with a patch grid (traced, or ``token_grid`` declared) and channels. A per-head attention projection
    (B,T,heads,head_dim), attention scores or a channels-first (B,C,H,W) output is not one."""
    axes = iter(traced_axes(forward, images, variables))
    batch = images.shape[0]
    outcomes: dict[str, _LayerView | LayerDescription] = {}  # name -> its view, or its refusal (of any call)
    for name, arrays in calls:
        candidates = [(element, (batch, *array.shape[1:]), next(axes)) for element, array in arrays]
        try:
            outcome: _LayerView | LayerDescription = _call_view(name, candidates, token_grid)
        except _NotALayer as refusal:
            outcome = LayerDescription(name, "refused", candidates[0][1], None, 0, None, str(refusal))
        if name not in outcomes or (isinstance(outcome, LayerDescription) and isinstance(outcomes[name], _LayerView)):
            outcomes[name] = outcome
    views = {name: view for name, view in outcomes.items() if isinstance(view, _LayerView)}
    refused = {name: refusal.reason for name, refusal in outcomes.items() if isinstance(refusal, LayerDescription)}
    return _Layers(tuple(views), views, refused, tuple(_description(outcome) for outcome in outcomes.values()))


def _description(outcome: _LayerView | LayerDescription) -> LayerDescription:
    """A layer's row of ``describe_layers`` from its view (a refusal is its own row)."""
    if isinstance(outcome, LayerDescription):
        return outcome
    name, _, tokens, shape = outcome
    if tokens is None:
        return LayerDescription(name, "map", shape, shape, 0, None, "")
    prefix, height, width = tokens
    return LayerDescription(name, "tokens", shape, (shape[0], height, width, shape[-1]), prefix, (height, width), "")


@dataclasses.dataclass(frozen=True, eq=False)
class LinenSplitModel(_TracedLayersModel):
    """Any Flax linen classifier ``module(images, **{train_argument: train}) -> logits`` as a split model.

    Its layers are its submodules that output one feature map (B,H,W,C) or one token sequence (B,T,D) (a
    transformer block), named by their paths (``stage3``, ``layer4.1``, ``Transformer.encoderblock_0``; see
    ``module_path``), found by tracing one call with ``flax.linen.intercept_methods``. A submodule that returns a
    tuple or list (big_vision's ``Encoder1DBlock`` returns ``(x, aux)``) is a layer when exactly one array in it is
    a map or a token sequence: that array is the layer's output (perturbed in place; the rest of the tuple passes
    through). An output of rank 3 to 5 that is neither (an attention projection (B,T,heads,head_dim), attention
    scores, an NCHW transpose) is not a layer, and ``check_layer`` says why (``_layers_of``). Linearising at a layer
    adds a zero perturbation to that submodule's output (to the patch tokens of a token sequence) in an ordinary
    forward pass, so the gradient there is exact, the pass runs once (dropout and BatchNorm statistics are those of
    this very pass) and ``jax.grad`` differentiates through it.

    Attributes:
      module: the linen module.
      example_images: images (B,S,S,3) of the size the model takes, to trace its layers (e.g. ``jnp.zeros((1, S, S,
        3))``).
      train_argument: the keyword of ``module.__call__`` that switches training mode (``None``: the module has none;
        the default ``"train"`` also becomes ``None`` for a module whose ``__call__`` has no mode argument at all).
        ``"deterministic"`` (HF's) and ``"use_running_average"`` are True in eval mode: they get ``not train``.
      state_collections: the mutable collections training updates (e.g. BatchNorm's ``batch_stats``).
      rng_collection: the rng collection dropout draws from.
      token_grid: ``(h, w)``, the patch grid of token sequences (B,T,D) whose grid cannot be traced from the images:
        their last h*w tokens are the patch tokens, row-major, after T - h*w prefix tokens. Grids that are traced
        (a conv or reshape patch embedding, a class token concatenated before it) need no declaration.
      output: what picks the logits (B,K) out of what the module returns when that is more than the logits: an
        index (``0`` for big_vision's ``(logits, out)``), a key or attribute name (``"logits"``), or a function
        ``out -> logits``.
    """

    module: nn.Module
    example_images: jax.Array
    train_argument: str | None = "train"
    state_collections: tuple[str, ...] = ("batch_stats",)
    rng_collection: str = "dropout"
    token_grid: tuple[int, int] | None = None
    output: OutputSelector | None = None

    def __post_init__(self):
        _check_adapter_options(self.token_grid, self.output)
        if self.train_argument is None:
            return
        parameters = inspect.signature(self.module.__call__).parameters
        if self.train_argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return
        mode_like = [name for name in parameters if name in _MODE_ARGUMENTS]
        inverted = [name for name in parameters if name in _INVERTED_MODE_ARGUMENTS]
        if self.train_argument == "train" and not mode_like and not inverted:
            object.__setattr__(self, "train_argument", None)  # a module without a training mode
            return
        hint = (f"pass train_argument={(mode_like or inverted)[0]!r}" if mode_like or inverted else
                "name the keyword that switches training mode")
        raise ValueError(f"{type(self.module).__name__}.__call__ has no {self.train_argument!r} argument (its "
                         f"arguments: {', '.join(parameters)}); {hint}, or train_argument=None if it has no "
                         "training mode")

    def _mode(self, train: bool) -> dict:
        if self.train_argument is None:
            return {}
        return {self.train_argument: not train if self.train_argument in _INVERTED_MODE_ARGUMENTS else train}

    def _call(self, variables, images, train, rng):
        rngs = {self.rng_collection: rng} if rng is not None else {}
        mutable = list(self.state_collections) if train else False
        out = self.module.apply(variables, images, rngs=rngs, mutable=mutable, **self._mode(train))
        out, state = out if train else (out, {})
        return _select_logits(out, self.output, type(self.module).__name__), state

    def _trace_layers(self, images):
        calls: list[tuple[str, list]] = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            candidates = _layer_candidates(out) if context.method_name == "__call__" and context.module.path else []
            if candidates:
                calls.append((module_path(context.module), candidates))
            return out

        def forward(images, variables):
            with nn.intercept_methods(record):
                self._call(variables, images, False, None)
            return [array for _, candidates in calls for _, array in candidates]

        variables = jax.eval_shape(self.init, jax.random.key(0), images)
        return _layers_of(forward, images, variables, calls, self.token_grid)

    def init(self, rng, images):
        init_rngs = {"params": rng, self.rng_collection: jax.random.fold_in(rng, 1)}
        return dict(self.module.init(init_rngs, images, **self._mode(False)))

    def apply(self, variables, images, *, train=False, rng=None):
        logits, state = self._call(variables, images, train, rng)
        return logits, dict(state)

    def _run(self, variables, images, train, rng, layers, perturbations):
        """``(logits, {layer: its map}, state)``; each of ``layers`` is observed and, with ``perturbations``,
        perturbed."""
        observe, outputs = self._observed(layers, perturbations)

        def perturb(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            name = module_path(context.module) if context.method_name == "__call__" else None
            return observe(name, out) if name in outputs else out

        with nn.intercept_methods(perturb):
            logits, state = self._call(variables, images, train, rng)
        return logits, _single_outputs(outputs), dict(state)

    def apply_perturbed(self, variables, images, perturbations, *, train=False, rng=None):
        layers = self.check_layers(tuple(perturbations))
        logits, _, state = self._run(variables, images, train, rng, layers, perturbations)
        return logits, state

    def linearize_layers(self, variables, images, layers, *, train=False, rng=None):
        layers = self.check_layers(layers)

        def forward(perturbations):
            logits, outputs, state = self._run(variables, images, train, rng, layers, perturbations)
            return logits, (outputs, state)

        return _linearize_by_perturbation(forward, layers)


def _single_outputs(outputs: dict[str, list]) -> dict[str, Any]:
    """``{layer: its output}`` from ``{layer: the outputs of each of its calls}``; a layer must run exactly once."""
    for layer, calls in outputs.items():
        if len(calls) != 1:
            raise ValueError(f"layer {layer!r} ran {len(calls)} times in one forward pass; split at a layer that runs "
                             "once")
    return {layer: calls[0] for layer, calls in outputs.items()}


def _linearize_by_perturbation(forward, layers: tuple[str, ...]) -> Linearization:
    """``forward(perturbations {layer: (B,H,W,C)} | None) -> (logits, (activations {layer: A}, state))`` adds each
    perturbation to its layer's map; linearised at zero perturbations, the cotangents of the perturbations are
    the gradients at the layers, exactly, from one forward and one backward pass."""
    shapes = jax.eval_shape(lambda: forward(None)[1][0])
    for layer in layers:
        _check_activations(layer, shapes[layer])
    zeros = {layer: jnp.zeros(shape.shape, shape.dtype) for layer, shape in shapes.items()}
    logits, vjp, (activations, state) = jax.vjp(forward, zeros, has_aux=True)
    return Linearization(activations, logits, lambda cotangent: vjp(cotangent)[0], state)


@contextlib.contextmanager
def _calls_observed(modules: Sequence[nnx.Module], observe: Callable[[nnx.Module, Any], Any]):
    """While active, every call of one of ``modules`` returns ``observe(module, output)``.

    NNX has no method interception, so the classes' ``__call__`` is wrapped for the duration (calls of other
    instances pass through unchanged); used only inside a trace of a freshly merged model.
    """
    targets = {id(module) for module in modules}

    def wrap(original):
        def call(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            return observe(self, out) if id(self) in targets else out
        return call

    with _calls_wrapped({type(module) for module in modules}, wrap):
        yield


@contextlib.contextmanager
def _calls_wrapped(classes, wrap: Callable[[Callable], Callable]):
    """While active, each class's ``__call__`` is ``wrap(original __call__)``."""
    originals = {cls: cls.__call__ for cls in classes}
    for cls, original in originals.items():
        cls.__call__ = wrap(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


@contextlib.contextmanager
def _calls_named(model: nnx.Module):
    """While active, every call of a submodule of ``model`` runs in ``jax.named_scope``s of its attribute path
    (relative to the calling submodule), so the ops of the trace carry the module path (``blocks/0/conv``), as
    linen's do; the propagation graph names its layers by it. Like ``_calls_observed``, only inside a trace of a
    freshly merged model."""
    submodules = [(tuple(path), module) for path, module in model.iter_modules() if path]
    paths = {id(module): path for path, module in submodules}
    active: list[tuple] = [()]  # the paths of the submodule calls under way

    def wrap(original):
        def call(self, *args, **kwargs):
            if id(self) not in paths:
                return original(self, *args, **kwargs)
            path, parent = paths[id(self)], active[-1]
            relative = path[len(parent):] if path[:len(parent)] == parent else path
            with contextlib.ExitStack() as scopes:
                for part in relative:
                    scopes.enter_context(jax.named_scope(str(part)))
                active.append(path)
                try:
                    return original(self, *args, **kwargs)
                finally:
                    active.pop()
        return call

    with _calls_wrapped({type(module) for _, module in submodules}, wrap):
        yield


def _nnx_path(path: tuple) -> str:
    return ".".join(str(part) for part in path)


@dataclasses.dataclass(frozen=True, eq=False)
class NNXSplitModel(_TracedLayersModel):
    """Any Flax NNX classifier ``module(images) -> logits`` as a split model.

    Variables are ``{"params": nnx.State of the nnx.Param leaves, "batch_stats": nnx.State of the nnx.BatchStat
    leaves}`` (``from_module`` splits a module that way); everything else (rng streams, static attributes) stays in
    the adapter. Training mode is ``module.train()`` (dropout on, BatchNorm on batch statistics), eval mode
    ``module.eval()``; in training the rng streams are reseeded from the ``rng`` argument, so dropout is a pure
    function of it. Layers are the submodules that output one feature map (B,H,W,C) or token sequence (B,T,D) (or
    a tuple with exactly one such array), named by their attribute paths (``conv1``, ``blocks.2``,
    ``encoder.layers.0``), in the order they run; see ``LinenSplitModel``.

    Attributes:
      graphdef: the module's structure, from ``nnx.split``.
      rest: the module's state other than params and BatchNorm statistics (rng streams).
      example_images: images (B,S,S,3) of the size the model takes, to trace its layers.
      initial_variables: the module's params and BatchNorm statistics when it was split.
      token_grid: ``(h, w)`` of token sequences whose patch grid cannot be traced (see ``LinenSplitModel``).
      output: what picks the logits (B,K) out of what the module returns (see ``LinenSplitModel``).
    """

    graphdef: Any
    rest: Any
    example_images: jax.Array
    initial_variables: Variables
    token_grid: tuple[int, int] | None = None
    output: OutputSelector | None = None

    def __post_init__(self):
        _check_adapter_options(self.token_grid, self.output)

    @classmethod
    def from_module(cls, module: nnx.Module, example_images: jax.Array, *, token_grid: tuple[int, int] | None = None,
                    output: OutputSelector | None = None) -> "NNXSplitModel":
        """The adapter and, as ``initial_variables``, the module's current params and BatchNorm statistics."""
        graphdef, *states = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
        params, batch_stats, rest = states
        return cls(graphdef, rest, example_images[:1], {"params": params, "batch_stats": batch_stats}, token_grid,
                   output)

    def _merged(self, variables: Variables, train: bool, rng) -> nnx.Module:
        # copy=True: fresh Variables that belong to this trace (dropout and reseeding mutate the rng state).
        model = nnx.merge(self.graphdef, variables["params"], variables.get("batch_stats", nnx.State({})),
                          self.rest, copy=True)
        if train:
            model.train()
            if rng is not None:
                keys = jax.tree.leaves(nnx.state(model, nnx.RngKey), is_leaf=lambda x: isinstance(x, nnx.Variable))
                streams = sorted({key.tag for key in keys})
                seeds: dict[str, Any] = {stream: jax.random.fold_in(rng, index) for index, stream in enumerate(streams)}
                nnx.reseed(model, **seeds)
        else:
            model.eval()
        return model

    def _run(self, variables, images, train, rng, perturbations: dict | None = None):
        """``(logits, {layer: its map}, state)``; each layer in ``perturbations`` is observed and, unless its
        perturbation is None, perturbed."""
        model = self._merged(variables, train, rng)
        perturbations = perturbations or {}
        submodules = {_nnx_path(path): module for path, module in model.iter_modules() if path}
        names = {id(submodules[layer]): layer for layer in perturbations}
        observe, outputs = self._observed(tuple(perturbations), perturbations)
        with (_calls_observed([submodules[layer] for layer in perturbations],
                              lambda module, out: observe(names[id(module)], out)), _calls_named(model)):
            logits = _select_logits(model(images), self.output, type(model).__name__)
        state = {"batch_stats": nnx.state(model, nnx.BatchStat)} if train else {}
        return logits, _single_outputs(outputs), state

    def _trace_layers(self, images):
        calls: list[tuple[str, list]] = []

        def forward(images, variables):
            model = self._merged(variables, False, None)
            paths = {id(module): _nnx_path(path) for path, module in model.iter_modules() if path}

            def record(module, out):
                candidates = _layer_candidates(out)
                if candidates:
                    calls.append((paths[id(module)], candidates))
                return out

            with _calls_observed([module for path, module in model.iter_modules() if path], record):
                _select_logits(model(images), self.output, type(model).__name__)
            return [array for _, candidates in calls for _, array in candidates]

        return _layers_of(forward, images, self.initial_variables, calls, self.token_grid)

    def init(self, rng, images):
        del rng, images  # an NNX module is created initialised: its variables came with it
        return dict(self.initial_variables)

    def apply(self, variables, images, *, train=False, rng=None):
        logits, _, state = self._run(variables, images, train, rng)
        return logits, state

    def apply_perturbed(self, variables, images, perturbations, *, train=False, rng=None):
        self.check_layers(tuple(perturbations))
        logits, _, state = self._run(variables, images, train, rng, dict(perturbations))
        return logits, state

    def linearize_layers(self, variables, images, layers, *, train=False, rng=None):
        layers = self.check_layers(layers)

        def forward(perturbations):
            perturbations = dict.fromkeys(layers) if perturbations is None else perturbations
            logits, outputs, state = self._run(variables, images, train, rng, perturbations)
            return logits, (outputs, state)

        return _linearize_by_perturbation(forward, layers)
