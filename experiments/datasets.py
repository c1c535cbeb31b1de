"""The experiments' data: where it lives, each dataset's normalisation and class names, loading (and building) its
splits, and the evaluation and training batch streams."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from attrjax import data as attr_data
from attrjax import distributed
from attrjax.data import _tfds_datasets as tfds_datasets, voc
from attrjax.training import data_mesh, process_rows


def quiet_tfds():
    """Experiments print their own progress: silence TFDS's progress bars and its per-load config warning."""
    tfds.disable_progress_bar()
    absl_logging.set_verbosity(absl_logging.ERROR)


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


# The real datasets: their normalisation, and the split that plays "val" (classification) and "localization".
NORMALIZATIONS = {"shapes": attr_data.SHAPES_NORMALIZATION, "voc2012": attr_data.VOC_NORMALIZATION,
                  "oxford_iiit_pet": attr_data.IMAGENET_NORMALIZATION,
                  "caltech_birds2011": attr_data.IMAGENET_NORMALIZATION}


def normalization(config) -> attr_data.Normalization:
    if config.data.name not in NORMALIZATIONS:
        raise ValueError(f"unknown dataset {config.data.name!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[config.data.name]


def class_names(config, workdir: str) -> tuple[str, ...]:
    if config.data.name == "shapes":
        return attr_data.CLASS_NAMES
    if config.data.name == "voc2012":
        return voc.CLASS_NAMES
    return tfds_datasets.class_names(config.data.name, data_dir(config, workdir))


def _shapes_splits(config, directory: str) -> dict:
    shapes = attr_data.ShapesConfig(**{field.name: config.data[field.name]
                                       for field in dataclasses.fields(attr_data.ShapesConfig)})
    sizes = dict(num_train=config.data.num_train, num_val=config.data.num_val,
                 num_localization=config.data.num_localization, seed=config.data.seed)
    attr_data.build_shapes(directory, shapes=shapes, **sizes)
    return {split: attr_data.load_split(directory, split, shapes=shapes, **sizes)
            for split in ("train", "val", "localization")}


def _voc_splits(config, directory: str) -> dict:
    """Main/train (encoded, cropped on the fly), Main/val and Segmentation/val resized
    (docs/method.md#data-and-preprocessing)."""
    voc.build_voc(directory, manual_dir=config.data.manual_dir or None)
    size, difficult = config.data.image_size, config.data.include_difficult
    print("voc2012: decoding and resizing the evaluation images")
    return {"train": voc.load_voc(directory, "train", include_difficult=difficult),
            "val": attr_data.resize_split(voc.load_voc(directory, "val", include_difficult=difficult), size),
            "localization": attr_data.resize_split(voc.load_voc(directory, "val", config="segmentation"), size,
                                                   labels_from_masks=True)}


def _tfds_splits(config, directory: str) -> dict:
    """A prepared TFDS dataset with masks: train (encoded), test resized for both classification and localisation."""
    test = attr_data.resize_split(tfds_datasets.load_tfds_split(config.data.name, "test", directory),
                                  config.data.image_size)
    return {"train": tfds_datasets.load_tfds_split(config.data.name, "train", directory),
            "val": {"image": test["image"], "labels": test["labels"]}, "localization": test}


def load_splits(config, workdir: str) -> dict[str, dict[str, np.ndarray] | attr_data.LabeledImages]:
    """Builds the dataset if needed; ``train`` as arrays (shapes) or encoded images, ``val`` and ``localization``
    as in-memory arrays (``localization`` with masks)."""
    quiet_tfds()
    normalization(config)  # an unknown dataset name fails here
    loaders = {"shapes": _shapes_splits, "voc2012": _voc_splits}
    with distributed.primary_first("building the dataset"):  # the others find it built
        splits = loaders.get(config.data.name, _tfds_splits)(config, data_dir(config, workdir))
    num_classes = splits["localization"]["labels"].shape[1]
    if num_classes != config.data.num_classes:
        raise ValueError(f"{config.data.name} has {num_classes} classes but config.data.num_classes is "
                         f"{config.data.num_classes}; set data.num_classes={num_classes}")
    if config.data.labels == "single":
        for name, split in splits.items():
            labels = split.labels if isinstance(split, attr_data.LabeledImages) else split["labels"]
            per_image = np.sum(np.asarray(labels) > 0, axis=-1)
            wrong = np.flatnonzero(per_image != 1)
            if wrong.size:
                raise ValueError(f"data.labels='single' needs exactly one class per image, but {wrong.size} images of "
                                 f"{config.data.name}'s {name} split have another count (image {wrong[0]} has "
                                 f"{per_image[wrong[0]]}); --config.data.labels=multilabel")
    return splits


def num_images(split: dict[str, np.ndarray] | attr_data.LabeledImages) -> int:
    return len(split) if isinstance(split, attr_data.LabeledImages) else len(split["image"])


def eval_batches(arrays: dict, config):
    """This process's share of an evaluation split (all of it in a single-process run)."""
    return attr_data.eval_batches(arrays, config.eval.batch_size, normalization=normalization(config),
                                  shard=distributed.process_shard())


def train_batches(train_split, config, start_step: int):
    """The training stream from ``start_step``, this process's rows of every global batch: random crops of
    in-memory arrays (shapes) or RandomResizedCrop of encoded images (the real datasets)."""
    loading = dict(rows=process_rows(config.data.batch_size, data_mesh()), workers=config.data.workers,
                   threads=config.data.threads or None)
    if isinstance(train_split, attr_data.LabeledImages):
        return attr_data.random_resized_crop_batches(
            train_split, config.data.batch_size, image_size=config.data.image_size, seed=config.seed,
            start_step=start_step, normalization=normalization(config), **loading)
    return attr_data.train_batches(train_split, config.data.batch_size, seed=config.seed, start_step=start_step,
                                   crop_padding=config.data.crop_padding, normalization=normalization(config),
                                   **loading)
