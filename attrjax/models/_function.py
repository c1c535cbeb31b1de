"""A classifier written as a plain JAX function, ``apply_fn(variables, images) -> logits``, as a split model.

A plain function has no submodules to intercept, so its layers are the values it names with
``jax.ad_checkpoint.checkpoint_name(x, "block0")``: the tag JAX code already puts on a block's output for
rematerialisation policies, which changes nothing in the computation. The function is traced to a jaxpr and
evaluated op by op (``_evaluate``), and each named value is observed there and, to linearise at it, perturbed, as the
module adapters do with a submodule's output; a named token sequence (B,T,D) is a token layer like a transformer
block of a module. Everything else (its ops, ``jit`` calls, custom derivatives) runs as traced, so gradients and
maps are those of the function itself. Without names, the function still has every input-level method (LRP,
rollout, the gradient family).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.extend import core as jax_core

from attrjax._jaxprs import bind, call_body
from attrjax.models._split import (OutputSelector, Variables, _check_adapter_options, _layer_candidates, _layers_of,
                                   _linearize_by_perturbation, _select_logits, _single_outputs, _TracedLayersModel)

_NAME = "name"  # the primitive of jax.ad_checkpoint.checkpoint_name


def _names_inside(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a call inside it) names a value with ``checkpoint_name``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == _NAME:
            return True
        body = call_body(eqn)
        if body is not None and _names_inside(body[0]):
            return True
    return False


def _evaluate(jaxpr, consts: list, args: list, observe: Callable[[str, Any], Any]) -> list:
    """The jaxpr's outputs for ``args``, each named value replaced by ``observe(name, value)``; calls that name
    values are evaluated inside, every other equation is bound as it is."""
    env: dict = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(atom):
        return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    for eqn in jaxpr.eqns:
        ins = [read(atom) for atom in eqn.invars]
        body = call_body(eqn)
        if eqn.primitive.name == _NAME:
            outs = [observe(eqn.params["name"], ins[0])]
        elif body is not None and _names_inside(body[0]):
            outs = _evaluate(*body, ins, observe)
        else:
            outs = bind(eqn, ins)
        env.update(zip(eqn.outvars, outs))
    return [read(atom) for atom in jaxpr.outvars]


def call_observed(fn: Callable, observe: Callable[[str, Any], Any], *args) -> Any:
    """``fn(*args)``, with every value ``fn`` names with ``checkpoint_name`` replaced by ``observe(name, value)``."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args), observe)
    return jax.tree.unflatten(jax.tree.structure(shape), outs)


def _check_eval_mode(train: bool) -> None:
    if train:
        raise ValueError("a plain function is applied in eval mode only; train it with your own step, or wrap its "
                         "init and apply functions in FunctionalSplitModel")


@dataclasses.dataclass(frozen=True, eq=False)
class PlainFunctionSplitModel(_TracedLayersModel):
    """A plain JAX classifier ``apply_fn(variables, images) -> logits`` as a split model.

    Its layers are the values it names with ``jax.ad_checkpoint.checkpoint_name(x, name)`` that are a feature map
    (B,H,W,C) or a token sequence (B,T,D), named by that name, in forward order (module docstring). Eval mode only:
    the function is applied as it is (``train=True`` is refused), so train a plain function with your own step or
    through ``FunctionalSplitModel``.

    Attributes:
      apply_fn: ``(variables, images (B,S,S,3)) -> logits (B,K)`` (or more than the logits, with ``output``).
      example_images: images of the size the function takes, to trace its layers.
      example_variables: its variables (or their shapes, ``jax.eval_shape``), to trace its layers; None: taken from
        the first call that has them (``as_split_model`` does not see the variables).
      token_grid: ``(h, w)`` for token sequences whose patch grid cannot be traced (as ``LinenSplitModel``).
      output: what picks the logits out of what the function returns (as ``LinenSplitModel``).
    """

    apply_fn: Callable[[Variables, jax.Array], Any]
    example_images: jax.Array
    example_variables: Any = None
    token_grid: tuple[int, int] | None = None
    output: OutputSelector | None = None

    def __post_init__(self):
        _check_adapter_options(self.token_grid, self.output)

    def _with_variables(self, variables) -> "PlainFunctionSplitModel":
        """This model with the shapes of ``variables`` to trace its layers, unless it has some already."""
        if self.example_variables is not None:
            return self
        return dataclasses.replace(self, example_variables=jax.eval_shape(lambda v: v, variables))

    def _trace_layers(self, images):
        if self.example_variables is None:
            raise ValueError("a plain function's layers are traced from its variables: pass example_variables= to "
                             "PlainFunctionSplitModel (or call a method that takes the variables first)")
        calls: list[tuple[str, list]] = []

        def record(name, value):
            candidates = _layer_candidates(value)
            if candidates:
                calls.append((name, candidates))
            return value

        def forward(images, variables):
            call_observed(self.apply_fn, record, variables, images)
            return [array for _, candidates in calls for _, array in candidates]

        return _layers_of(forward, images, self.example_variables, calls, self.token_grid)

    def check_layer(self, layer: str) -> None:
        """Checked once the variables are known (the layers are traced from them): here only when they are."""
        if self.example_variables is not None:
            super().check_layer(layer)

    def init(self, rng, images):
        raise ValueError("a plain function has no initialiser attrjax can call; create its variables yourself, or "
                         "wrap init and apply functions in FunctionalSplitModel to train it")

    def _run(self, variables, images, train, perturbations):
        """``(logits, {layer: its map})``; each layer in ``perturbations`` is observed and, unless its perturbation
        is None, perturbed."""
        _check_eval_mode(train)
        observe, outputs = self._observed(tuple(perturbations), perturbations)
        out = call_observed(self.apply_fn, lambda name, value: observe(name, value) if name in outputs else value,
                            variables, images)
        return self._logits(out), outputs

    def _logits(self, out) -> jax.Array:
        return _select_logits(out, self.output, getattr(self.apply_fn, "__name__", "the function"))

    def apply(self, variables, images, *, train=False, rng=None):
        _check_eval_mode(train)
        return self._logits(self.apply_fn(variables, images)), {}

    def apply_perturbed(self, variables, images, perturbations, *, train=False, rng=None):
        model = self._with_variables(variables)
        model.check_layers(tuple(perturbations))
        return model._run(variables, images, train, dict(perturbations))[0], {}

    def linearize_layers(self, variables, images, layers, *, train=False, rng=None):
        model = self._with_variables(variables)
        layers = model.check_layers(layers)

        def forward(perturbations):
            logits, outputs = model._run(variables, images, train, perturbations or dict.fromkeys(layers))
            return logits, (_single_outputs(outputs), {})

        return _linearize_by_perturbation(forward, layers)


__all__ = ["PlainFunctionSplitModel", "call_observed"]
