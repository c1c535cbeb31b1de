"""``as_split_model``: the one place that turns what a user passes as a model into a split model."""

from __future__ import annotations

from typing import Any, Callable, Union

import flax.linen as nn
import jax

from flax import nnx

from attrjax.models._function import PlainFunctionSplitModel
from attrjax.models._split import LinenSplitModel, NNXSplitModel, OutputSelector, SplitModel
from attrjax.models._vgg import VGG, vgg_split_model

ModelLike = Union[SplitModel, nn.Module, nnx.Module, Callable[..., Any]]
"""What every function that takes a ``model`` accepts: a split model, a Flax linen or NNX classifier, or a plain
function ``apply_fn(variables, images) -> logits``."""


def as_split_model(model: ModelLike, example_images: jax.Array, *, token_grid: tuple[int, int] | None = None,
                   output: OutputSelector | None = None) -> SplitModel:
    """A ``SplitModel`` as it is, attrjax's ``VGG`` through its own features/head, any other Flax linen module
    through ``LinenSplitModel``, a Flax NNX module through ``NNXSplitModel.from_module`` (its variables are then
    ``{"params": nnx.Param state, "batch_stats": nnx.BatchStat state}``), and a plain function ``apply_fn(variables,
    images) -> logits`` through ``PlainFunctionSplitModel`` (its layers: the values it names with
    ``jax.ad_checkpoint.checkpoint_name``). ``example_images`` (B,S,S,3): images of the size the model takes.

    For a Flax module or a function: ``token_grid=(h, w)`` declares the patch grid of token sequences whose grid
    cannot be traced from the images, and ``output`` picks the logits (B,K) out of what a module returns when that
    is more than the logits (an index, a key or attribute name, or a function ``out -> logits``; see
    ``LinenSplitModel``)."""
    if isinstance(model, (SplitModel, VGG)):
        given = [f"{name}={value!r}" for name, value in (("token_grid", token_grid), ("output", output))
                 if value is not None]
        if given:
            raise ValueError(f"token_grid= and output= are for a Flax module or a function; a {type(model).__name__} "
                             f"takes neither (got {', '.join(given)}): build the split model with them instead")
        return model if isinstance(model, SplitModel) else vgg_split_model(model)
    if isinstance(model, nn.Module):
        return LinenSplitModel(model, example_images[:1], token_grid=token_grid, output=output)
    if isinstance(model, nnx.Module):
        return NNXSplitModel.from_module(model, example_images, token_grid=token_grid, output=output)
    if callable(model):
        return PlainFunctionSplitModel(model, example_images[:1], token_grid=token_grid, output=output)
    raise TypeError(f"cannot attribute a {type(model).__name__}: pass a Flax linen or NNX module, a function "
                    "apply_fn(variables, images) -> logits, or an attrjax.models.SplitModel")


def logits_fn(model: ModelLike, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """``images (B,S,S,3) -> logits (B,K)`` of any model that ``as_split_model`` takes, in eval mode."""
    return lambda images: as_split_model(model, images).apply(variables, images)[0]
