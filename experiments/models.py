"""The experiments' models: architectures and compute dtypes, building a teacher or student from its config,
initialising it (fresh or from pretrained weights), its layers, and the training objectives."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.models import (VGG, as_split_model, import_resnet, import_vgg, load_state_dict, resnet18, resnet34,
                            resnet50, resnet_small, vgg)
from attrjax.training import Objective


RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet_small": resnet_small}
ARCHITECTURES = ("vgg",) + tuple(RESNETS)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACCELERATORS = ("gpu", "tpu")


def compute_dtype_name(config) -> str:
    """What teachers and students train in: ``config.compute_dtype``, with ``"auto"`` resolved to bfloat16 on a
    GPU or TPU and float32 elsewhere. Parameters, optimizer state, losses and maps stay float32, and evaluation
    runs in float32."""
    if config.compute_dtype == "auto":
        return "bfloat16" if jax.default_backend() in ACCELERATORS else "float32"
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be 'auto' or one of {', '.join(COMPUTE_DTYPES)}, got "
                         f"{config.compute_dtype!r}")
    return config.compute_dtype


def compute_dtype(config):
    """``compute_dtype_name(config)`` as a dtype."""
    return COMPUTE_DTYPES[compute_dtype_name(config)]


def build_model(model_config, config, *, dtype=None):
    """The model of a teacher/student config by ``arch``: ``vgg`` (``layout``, ``width_divisor``, ``dropout_rate``,
    ``head_pooling``) or a ResNet (``resnet18/34/50`` with ``width_divisor`` and ``stem``; ``resnet_small`` with
    ``width_divisor`` and ``stage_sizes``), computing in ``dtype`` (default: ``compute_dtype(config)``)."""
    arch = model_config.arch
    dtype = compute_dtype(config) if dtype is None else dtype
    if arch == "vgg":
        return vgg(model_config.layout, num_classes=config.data.num_classes, image_size=config.data.image_size,
                   width_divisor=model_config.width_divisor, attribution_layer=config.matching_layer,
                   dropout_rate=model_config.dropout_rate, head_pooling=model_config.head_pooling, dtype=dtype)
    if arch not in RESNETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    options = ({"stage_sizes": tuple(model_config.stage_sizes)} if arch == "resnet_small"
               else {"stem": model_config.stem})
    return RESNETS[arch](config.data.num_classes, width_divisor=model_config.width_divisor, dtype=dtype, **options)


def example_images(config) -> jax.Array:
    return jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)


def check_layer(role: str, model, layer: str, config) -> None:
    """Raises, listing the model's layers, unless ``layer`` is one of them (traced shapes only, nothing runs)."""
    split = as_split_model(model, example_images(config))
    if layer not in split.layers:
        raise ValueError(f"the {role} has no layer {layer!r}; it has: {', '.join(split.layers)}")


@functools.partial(jax.jit, static_argnums=(0, 2))
def _fresh_variables(model, rng: jax.Array, image_size: int) -> dict:
    """One compiled initialisation per architecture and image size (``model`` is a hashable linen module): run
    eagerly, every layer's initialiser dispatches and compiles on its own, several times slower."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return as_split_model(model, images).init(rng, images)


def init_model(model, rng: jax.Array, config) -> dict:
    """Fresh variables of a model from ``build_model``."""
    return _fresh_variables(model, rng, config.data.image_size)


def variables_template(model, config) -> dict:
    """Zeros shaped as ``init_model``'s variables, without running the model: a template to restore into, or to
    check settings against the architecture."""
    shapes = _fresh_variables.eval_shape(model, jax.random.key(0), config.data.image_size)
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def pretrained_variables(name: str, path: str, model, fresh_variables: dict) -> dict:
    """The convs and BatchNorms of a torchvision-layout state dict (e.g. ImageNet ``vgg16_bn`` or ``resnet50``:
    .pth, .safetensors or .npz) under the fresh classifier of ``fresh_variables``, as the paper builds its teacher."""
    importer = import_vgg if isinstance(model, VGG) else import_resnet
    variables = importer(load_state_dict(path), model, new_head_variables=fresh_variables)
    print(f"[{name}] features from {path}, a new {model.num_classes}-way classifier")
    return variables


def make_objective(config, **options) -> Objective:
    """The training objective with the dataset's label kind (``config.data.labels``: multilabel or single)."""
    return Objective(labels=config.data.labels, **options)


def compression_objective(config, run) -> Objective:
    """The objective of a student or pruning run: its ``run.objective`` options, matched at
    ``config.matching_layer``."""
    return make_objective(config, matching_layer=config.matching_layer, **run.objective)
