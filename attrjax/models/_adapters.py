"""``as_split_model``: the one place that turns what a user passes as a model into a split model."""

from __future__ import annotations

from typing import Callable, Union

import flax.linen as nn
import jax

from flax import nnx

from attrjax.models._split import LinenSplitModel, NNXSplitModel, SplitModel
from attrjax.models._vgg import VGG, vgg_split_model

ModelLike = Union[SplitModel, nn.Module, nnx.Module]
"""What every function that takes a ``model`` accepts: a split model, or a Flax linen or NNX classifier."""


def as_split_model(model: ModelLike, example_images: jax.Array) -> SplitModel:
    """A ``SplitModel`` as it is, attrjax's ``VGG`` through its own features/head, any other Flax linen module
    through ``LinenSplitModel``, a Flax NNX module through ``NNXSplitModel.from_module`` (its variables are then
    ``{"params": nnx.Param state, "batch_stats": nnx.BatchStat state}``). ``example_images`` (B,S,S,3): images of the
    size the model takes."""
    if isinstance(model, SplitModel):
        return model
    if isinstance(model, VGG):
        return vgg_split_model(model)
    if isinstance(model, nn.Module):
        return LinenSplitModel(model, example_images[:1])
    if isinstance(model, nnx.Module):
        return NNXSplitModel.from_module(model, example_images)
    raise TypeError(f"cannot attribute a {type(model).__name__}: pass a Flax linen or NNX module or an "
                    "attrjax.models.SplitModel (FunctionalSplitModel wraps plain features/head functions)")


def logits_fn(model: ModelLike, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """``images (B,S,S,3) -> logits (B,K)`` of any model that ``as_split_model`` takes, in eval mode."""
    return lambda images: as_split_model(model, images).apply(variables, images)[0]
