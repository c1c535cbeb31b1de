"""Datasets (the embedded synthetic shapes, as a TFDS array_record builder; PASCAL VOC, Oxford-IIIT Pet and CUB read
from prepared array_record copies) and the NumPy input pipeline."""

import importlib
from typing import TYPE_CHECKING

from attrjax import _deprecation
from attrjax.data._images import (
    VOID,
    LabeledImages,
    present_classes,
    random_resized_crop_batches,
    resize_split,
)
from attrjax.data._pipeline import (
    IMAGENET_NORMALIZATION,
    SHAPES_NORMALIZATION,
    VOC_NORMALIZATION,
    Normalization,
    eval_batches,
    normalize,
    train_batches,
)
from attrjax.data._shapes import CLASS_NAMES, ShapesConfig, render_example, render_split

# The builder module is imported on first use rather than here: `python -m attrjax.data.builder` imports this
# package first, and an eager import would load the builder twice (runpy warns, and TFDS would see the dataset
# class defined twice).
_BUILDER_EXPORTS = (
    "SPLITS", "AttrjaxShapes", "ShapesBuilderConfig", "build_shapes", "load_split", "split_seed"
)
# The readers of prepared TFDS datasets import tensorflow_datasets, which `import attrjax.data` does not: they too are
# imported on first use (name -> the module that defines it).
_LAZY_EXPORTS = {
    **dict.fromkeys(_BUILDER_EXPORTS, "attrjax.data.builder"),
    **dict.fromkeys(("class_names", "load_tfds_split", "prepare_command"), "attrjax.data._tfds_datasets"),
    **dict.fromkeys(("RecordFeature", "read_records"), "attrjax.data._prepared"),
}

if TYPE_CHECKING:  # for type checkers and the API reference; at run time, __getattr__ imports them
    from attrjax.data._prepared import RecordFeature, read_records
    from attrjax.data._tfds_datasets import class_names, load_tfds_split, prepare_command

_moved = _deprecation.package_getattr(__name__)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    return _moved(name)  # the 0.1 submodules, now private, as stand-ins that warn


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CLASS_NAMES",
    "IMAGENET_NORMALIZATION",
    "VOID",
    "LabeledImages",
    "present_classes",
    "random_resized_crop_batches",
    "resize_split",
    "SHAPES_NORMALIZATION",
    "VOC_NORMALIZATION",
    "Normalization",
    "ShapesConfig",
    "eval_batches",
    "normalize",
    "render_example",
    "render_split",
    "train_batches",
    *_BUILDER_EXPORTS,
    "RecordFeature",
    "class_names",
    "load_tfds_split",
    "prepare_command",
    "read_records",
]
