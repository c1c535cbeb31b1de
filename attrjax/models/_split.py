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

Adapters: ``LinenSplitModel`` wraps any Flax linen module without methods of its own (it finds the layers by
intercepting submodule calls, and takes the gradient at a layer through a zero perturbation of its output),
``NNXSplitModel`` does the same for a Flax NNX module, and ``FunctionalSplitModel`` takes plain ``features``/``head``
functions.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attrjax.models._layout import IMAGE_AXES, describe, is_feature_map, traced_axes

Variables = Mapping[str, Any]
# Keywords that switch a linen module's training mode under another name than ``train`` (named in errors); the
# inverted ones are True in eval mode, so they cannot serve as ``train_argument``.
_MODE_ARGUMENTS = ("training", "is_training", "train_mode")
_INVERTED_MODE_ARGUMENTS = ("deterministic", "use_running_average")


class LayerLinearization(NamedTuple):
    """One forward pass of a split model, linearised at a layer."""

    activations: jax.Array  # A, (B,H,W,C)
    logits: jax.Array  # (B,K)
    vjp: Callable[[jax.Array], jax.Array]  # cotangent (B,K) -> d(cotangent . logits)/dA (B,H,W,C)
    state: Variables  # updated state collections (train mode), else {}


class Linearization(NamedTuple):
    """One forward pass of a split model, linearised at several layers at once."""

    activations: dict[str, jax.Array]  # layer -> A (B,H,W,C)
    logits: jax.Array  # (B,K)
    vjp: Callable[[jax.Array], dict[str, jax.Array]]  # cotangent (B,K) -> layer -> d(cotangent . logits)/dA
    state: Variables  # updated state collections (train mode), else {}


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
        output. Propagation methods (LRP, Excitation Backprop, RAP) read relevance at a layer through it."""
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
        """Submodules whose output has rank 4 but is not a feature map (B,H,W,C), so they are not ``layers``: name ->
        why (``check_layer``'s error)."""
        return {}

    def check_layer(self, layer: str) -> None:
        """Raises ValueError unless ``layer`` is one of ``layers``: why it is not a feature map, or the layers."""
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
        """The (B,H,W,C) shape of the activations at ``layer`` for ``images`` (nothing is computed)."""
        return jax.eval_shape(lambda v, x: self.linearize(v, x, layer).activations, variables, images).shape


def check_images(images, where: str) -> None:
    """Raises ValueError unless ``images`` (B,S,S,3) are floating point: the normalised floats a network takes,
    never raw 8-bit pixels. Reads the dtype only (no transfer, no sync)."""
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: images must be floating point (normalised floats), got {dtype}; convert them, "
                         "e.g. images.astype(np.float32) / 255, then apply the dataset's normalisation (subtract its "
                         "mean, divide by its std)")


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


class _TracedLayersModel(SplitModel):
    """A split model whose layers are found by tracing one forward pass (``_traced_layers``, computed once by each
    subclass: linen and NNX modules)."""

    @property
    @abc.abstractmethod
    def _traced_layers(self) -> "_Layers":
        """The layers and the refused rank-4 outputs, from one traced forward pass."""

    @property
    def layers(self) -> tuple[str, ...]:
        """The submodules whose output is one feature map (B,H,W,C), in the order those outputs are computed (see
        ``_feature_map_layers``)."""
        return self._traced_layers.names

    @property
    def not_feature_maps(self) -> Mapping[str, str]:
        return self._traced_layers.not_feature_maps


@dataclasses.dataclass(frozen=True, eq=False)
class LinenSplitModel(_TracedLayersModel):
    """Any Flax linen classifier ``module(images, **{train_argument: train}) -> logits`` as a split model.

    Its layers are its submodules that output one feature map (B,H,W,C), named by their paths (``stage3``,
    ``layer4.1``, ``backbone.block2.conv``; see ``module_path``), found by tracing one call with
    ``flax.linen.intercept_methods``; a rank-4 output that is not a map (an attention projection, an NCHW
    transpose) is not a layer, and ``check_layer`` says why (``_feature_map_layers``). Linearising at a layer adds
    a zero perturbation to that submodule's output in an ordinary forward pass, so the gradient there is exact, the
    pass runs once (dropout and BatchNorm statistics are those of this very pass) and ``jax.grad`` differentiates
    through it.

    Attributes:
      module: the linen module.
      example_images: images (B,S,S,3) of the size the model takes, to trace its layers (e.g. ``jnp.zeros((1, S, S,
        3))``).
      train_argument: the keyword of ``module.__call__`` that switches training mode (``None``: the module has none;
        the default ``"train"`` also becomes ``None`` for a module whose ``__call__`` has no mode argument at all).
      state_collections: the mutable collections training updates (e.g. BatchNorm's ``batch_stats``).
      rng_collection: the rng collection dropout draws from.
    """

    module: nn.Module
    example_images: jax.Array
    train_argument: str | None = "train"
    state_collections: tuple[str, ...] = ("batch_stats",)
    rng_collection: str = "dropout"

    def __post_init__(self):
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
        hint = (f"pass train_argument={mode_like[0]!r}" if mode_like else
                f"wrap the module so that a keyword switches training mode ({inverted[0]!r} is True in eval mode)"
                if inverted else "name the keyword that switches training mode")
        raise ValueError(f"{type(self.module).__name__}.__call__ has no {self.train_argument!r} argument (its "
                         f"arguments: {', '.join(parameters)}); {hint}, or train_argument=None if it has no "
                         "training mode")

    def _mode(self, train: bool) -> dict:
        return {} if self.train_argument is None else {self.train_argument: train}

    def _call(self, variables, images, train, rng):
        rngs = {self.rng_collection: rng} if rng is not None else {}
        mutable = list(self.state_collections) if train else False
        out = self.module.apply(variables, images, rngs=rngs, mutable=mutable, **self._mode(train))
        return out if train else (out, {})

    @functools.cached_property
    def _traced_layers(self) -> "_Layers":
        calls: list[tuple[str, jax.Array]] = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path and getattr(out, "ndim", 0) == 4:
                calls.append((module_path(context.module), out))
            return out

        def forward(images, variables):
            with nn.intercept_methods(record):
                self._call(variables, images, False, None)
            return [out for _, out in calls]

        variables = jax.eval_shape(self.init, jax.random.key(0), self.example_images)
        return _feature_map_layers(forward, self.example_images, variables, calls)

    def init(self, rng, images):
        init_rngs = {"params": rng, self.rng_collection: jax.random.fold_in(rng, 1)}
        return dict(self.module.init(init_rngs, images, **self._mode(False)))

    def apply(self, variables, images, *, train=False, rng=None):
        logits, state = self._call(variables, images, train, rng)
        return logits, dict(state)

    def _run(self, variables, images, train, rng, layers, perturbations):
        """``(logits, {layer: output}, state)``; each of ``layers`` is observed and, with ``perturbations``,
        perturbed."""
        outputs: dict[str, list[jax.Array]] = {layer: [] for layer in layers}

        def perturb(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            name = module_path(context.module) if context.method_name == "__call__" else None
            if name in outputs:
                outputs[name].append(out)
                return out if perturbations is None else out + perturbations[name]
            return out

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


class _Layers(NamedTuple):
    names: tuple[str, ...]  # the submodules that output a feature map, in forward order
    not_feature_maps: dict[str, str]  # the other submodules with a rank-4 output -> why they are not layers


def _feature_map_layers(forward: Callable, images: jax.Array, variables: Variables,
                        calls: list[tuple[str, jax.Array]]) -> _Layers:
    """The layers of a network: ``forward(images (B,S,S,3), variables) -> outputs`` runs it once, appending
    ``(submodule name, output)`` to ``calls`` for every rank-4 output and returning those outputs. A submodule is a
    layer when every output of it is a feature map: its axes, traced from the images through the network's jaxpr
    (``traced_axes``), are the images' batch, height and width and, last, channels. A per-head attention
    projection (B,T,heads,head_dim) or a channels-first (B,C,H,W) output has rank 4 but is not one."""
    axes = traced_axes(forward, images, variables)
    refused: dict[str, str] = {}
    for (name, out), out_axes in zip(calls, axes):
        if not is_feature_map(out_axes) and name not in refused:
            refused[name] = (
                f"layer {name!r} outputs (B, {', '.join(map(str, out.shape[1:]))}) with axes {describe(out_axes)}, "
                "not a feature map "
                f"{describe(IMAGE_AXES)}: its axes, traced from the images through the network, are not the images' "
                "batch, height and width with channels last, so a map of it would be read along the wrong axes. "
                "Split at a layer that keeps the images' layout (a convolution, or a normalisation or activation "
                "after one); transpose a channels-first output to channels-last in the model; per-head attention "
                "projections and token sequences are not feature maps")
    names = tuple(dict.fromkeys(name for name, _ in calls if name not in refused))
    return _Layers(names, refused)


def _single_outputs(outputs: dict[str, list]) -> dict[str, Any]:
    """``{layer: its output}`` from ``{layer: the outputs of each of its calls}``; a layer must run exactly once."""
    for layer, calls in outputs.items():
        if len(calls) != 1:
            raise ValueError(f"layer {layer!r} ran {len(calls)} times in one forward pass; split at a layer that runs "
                             "once")
    return {layer: calls[0] for layer, calls in outputs.items()}


def _linearize_by_perturbation(forward, layers: tuple[str, ...]) -> Linearization:
    """``forward(perturbations {layer: (B,H,W,C)} | None) -> (logits, (activations {layer: A}, state))`` adds each
    perturbation to its layer's output; linearised at zero perturbations, the cotangents of the perturbations are
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
    function of it. Layers are the submodules that output one feature map (B,H,W,C), named by their attribute
    paths (``conv1``, ``blocks.2``), in the order they run.

    Attributes:
      graphdef: the module's structure, from ``nnx.split``.
      rest: the module's state other than params and BatchNorm statistics (rng streams).
      example_images: images (B,S,S,3) of the size the model takes, to trace its layers.
    """

    graphdef: Any
    rest: Any
    example_images: jax.Array
    initial_variables: Variables

    @classmethod
    def from_module(cls, module: nnx.Module, example_images: jax.Array) -> "NNXSplitModel":
        """The adapter and, as ``initial_variables``, the module's current params and BatchNorm statistics."""
        graphdef, *states = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
        params, batch_stats, rest = states
        return cls(graphdef, rest, example_images[:1], {"params": params, "batch_stats": batch_stats})

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
        """``(logits, {layer: output}, state)``; each layer in ``perturbations`` is observed and, unless its
        perturbation is None, perturbed."""
        model = self._merged(variables, train, rng)
        perturbations = perturbations or {}
        submodules = {_nnx_path(path): module for path, module in model.iter_modules() if path}
        names = {id(submodules[layer]): layer for layer in perturbations}
        outputs: dict[str, list[jax.Array]] = {layer: [] for layer in perturbations}

        def observe(module, out):
            layer = names[id(module)]
            outputs[layer].append(out)
            return out if perturbations[layer] is None else out + perturbations[layer]

        with _calls_observed([submodules[layer] for layer in perturbations], observe), _calls_named(model):
            logits = model(images)
        state = {"batch_stats": nnx.state(model, nnx.BatchStat)} if train else {}
        return logits, _single_outputs(outputs), state

    @functools.cached_property
    def _traced_layers(self) -> "_Layers":
        calls: list[tuple[str, jax.Array]] = []

        def forward(images, variables):
            model = self._merged(variables, False, None)
            paths = {id(module): _nnx_path(path) for path, module in model.iter_modules() if path}

            def record(module, out):
                if getattr(out, "ndim", 0) == 4:
                    calls.append((paths[id(module)], out))
                return out

            with _calls_observed([module for path, module in model.iter_modules() if path], record):
                model(images)
            return [out for _, out in calls]

        return _feature_map_layers(forward, self.example_images, self.initial_variables, calls)

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
