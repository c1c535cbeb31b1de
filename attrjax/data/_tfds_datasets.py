"""Oxford-IIIT Pet and CUB-200-2011, with their masks, read from the user's prepared TFDS copies without TensorFlow.

    pets = load_tfds_split("oxford_iiit_pet", "test", "/data")        # LabeledImages, (N, 37) one-hot
    birds = load_tfds_split("caltech_birds2011", "test", "/data")     # LabeledImages, (N, 200) one-hot

TFDS knows both datasets, but preparing them downloads the archives and runs the TFDS builders, which need
TensorFlow (and opencv-python for caltech_birds2011): prepare them once on a machine that has internet and those,
in the array_record format that is read here through `builder.as_data_source` (see `prepare_command`). Reading
needs neither: images and masks stay encoded bytes, and only the masks are decoded, once, to move them to the
convention of `attrjax.data`: 0 background, c + 1 for class c, 255 (`VOID`) for pixels of no class.

- oxford_iiit_pet: the trimap (1 pet, 2 background, 3 the uncertain border around the pet) becomes label + 1 for
  the pet, 0 for the background and `VOID` for the border, which belongs to neither.
- caltech_birds2011: the segmentation is greyscale 0-255, the annotators' masks averaged (TFDS stores it as OpenCV
  reads it in greyscale), so the bird's outline takes intermediate values. A pixel is bird (label + 1) when its
  value is at least `CUB_BIRD_THRESHOLD` = 128, i.e. when at least half the annotators marked it; else 0.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import time
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from attrjax.data import _prepared as prepared
from attrjax.data._images import VOID, LabeledImages, decode_mask, encode_png
from attrjax.data._loader import default_threads

PET_TRIMAP_PET, PET_TRIMAP_BACKGROUND, PET_TRIMAP_BORDER = 1, 2, 3
CUB_BIRD_THRESHOLD = 128


def pet_trimap_to_mask(trimap: np.ndarray, label: int, name: str = "trimap") -> np.ndarray:
    """(H, W) uint8 Oxford-IIIT Pet trimap (1 pet, 2 background, 3 border) -> (H, W) uint8 class mask.

    The pet becomes `label` + 1, the background 0 and the border `VOID`; any other value is an error naming `name`.
    """
    unknown = np.setdiff1d(np.unique(trimap), (PET_TRIMAP_PET, PET_TRIMAP_BACKGROUND, PET_TRIMAP_BORDER))
    if unknown.size:
        raise ValueError(f"{name} has trimap value {int(unknown[0])}; Oxford-IIIT Pet trimaps hold only 1 (pet), "
                         "2 (background) and 3 (border): the prepared dataset is damaged, prepare it again")
    mask = np.zeros(trimap.shape, dtype=np.uint8)
    mask[trimap == PET_TRIMAP_PET] = label + 1
    mask[trimap == PET_TRIMAP_BORDER] = VOID
    return mask


def cub_segmentation_to_mask(segmentation: np.ndarray, label: int, name: str = "segmentation") -> np.ndarray:
    """(H, W) uint8 CUB-200-2011 greyscale segmentation -> (H, W) uint8 class mask.

    Pixels >= `CUB_BIRD_THRESHOLD` (at least half the annotators) become `label` + 1, the others 0. `name` is
    unused: every uint8 value is valid, and it is kept for the signature shared with `pet_trimap_to_mask`.
    """
    del name
    return np.where(segmentation >= CUB_BIRD_THRESHOLD, np.uint8(label + 1), np.uint8(0))


@dataclasses.dataclass(frozen=True)
class _MaskedDataset:
    """What differs between the TFDS datasets read here: the feature with the file name, the mask mapping."""

    filename_feature: str
    to_class_mask: Callable[[np.ndarray, int, str], np.ndarray]
    build_requirements: str  # pip packages that `tfds build` needs


DATASETS = {
    "oxford_iiit_pet": _MaskedDataset("file_name", pet_trimap_to_mask, "tensorflow"),
    "caltech_birds2011": _MaskedDataset("image/filename", cub_segmentation_to_mask, "tensorflow opencv-python"),
}


def prepare_command(name: str, data_dir: str | os.PathLike) -> str:
    """The shell command that prepares dataset `name` in `data_dir` in the array_record format read here."""
    return f"tfds build {name} --data_dir {os.fspath(data_dir)} --file_format=array_record"


def _what_is_there(builder: tfds.core.DatasetBuilder) -> str:
    """Why `builder` is not prepared, from the folders in its dataset folder, and what to delete beforehand."""
    dataset_dir = builder.data_path.parent
    folders = dataset_dir.iterdir() if dataset_dir.is_dir() else []
    versions = sorted(path.name for path in folders if tfds.core.Version.is_valid(path.name))
    if builder.data_path.exists():
        reason = (f"{prepared.unfinished(builder)}; delete it first: `tfds build` would take the folder for a "
                  "finished build and build nothing")
    elif versions:
        reason = (f"it has only version(s) {', '.join(versions)} and this tensorflow-datasets reads "
                  f"{builder.version}")
    else:
        reason = f"there is no {builder.data_path}"
    for folder in prepared.leftover_folders(builder):
        reason += f"; delete {folder}, left by a build that was killed before it finished"
    return reason


def _builder(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """The prepared builder of `name` in `data_dir`; raises naming what is missing and how to prepare it."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; load_tfds_split reads {', '.join(DATASETS)}")
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{name} is not prepared in {os.fspath(data_dir)} ({_what_is_there(builder)}). Prepare it once where "
            f"there is internet access (TFDS downloads it) and `pip install {DATASETS[name].build_requirements}`: "
            f"`{prepare_command(name, data_dir)}`; if you prepare it on another machine, copy the {name} folder "
            f"of its data_dir to {builder.data_path.parent}")
    formats = {file_format.value for file_format in builder.info.available_file_formats()}
    readable = {file_format.value for file_format in tfds.core.FileFormat.with_random_access()}
    if not formats & readable:
        raise ValueError(
            f"{name} in {builder.data_path} is stored as {', '.join(sorted(formats))} only, which has no random "
            f"access; reading without TensorFlow needs array_record. Convert it where TensorFlow is installed with "
            f"`tfds convert_format --dataset_version_dir {builder.data_path} --out_file_format array_record`, or "
            f"prepare it again with `{prepare_command(name, data_dir)}`")
    return builder


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    """Raises ValueError unless every split named in `split` ('test', 'train[:100]', 'train+test') exists."""
    known = list(builder.info.splits)
    for part in split.split("+"):
        if part.split("[")[0].strip() not in known:
            raise ValueError(f"unknown split {split!r} for {builder.name}; it has {', '.join(known)} (TFDS slices "
                             "such as 'train[:100]' or 'train[:10%]' work too)")


@dataclasses.dataclass(frozen=True)
class _SmallFields:
    """What the scan keeps of a record: all but the image, which is read again where a batch needs it."""

    name: str  # the file stem
    label: int
    image_size: tuple[int, int]  # (height, width), from the JPEG's header
    mask: bytes  # encoded as stored


def _small_fields(record: dict, dataset: _MaskedDataset) -> _SmallFields:
    name = os.path.splitext(os.path.basename(record[dataset.filename_feature].decode()))[0]
    try:
        image_width, image_height = Image.open(io.BytesIO(record["image"])).size
    except (OSError, SyntaxError) as error:
        raise ValueError(f"the image of {name} cannot be read ({error}); prepare the dataset again") from error
    return _SmallFields(name, int(record["label"]), (image_height, image_width), record["segmentation_mask"])


def _class_mask(fields: _SmallFields, dataset: _MaskedDataset, num_classes: int) -> bytes:
    """The record's stored mask -> its class mask (module docstring), re-encoded as PNG."""
    name = fields.name
    if not 0 <= fields.label < num_classes:
        raise ValueError(f"{name} has label {fields.label}, outside [0, {num_classes}); prepare the dataset again")
    stored = decode_mask(fields.mask, f"the mask of {name}")
    if stored.ndim == 3 and stored.shape[-1] == 1:
        stored = stored[..., 0]
    if stored.ndim != 2:
        raise ValueError(f"the mask of {name} has shape {stored.shape}; expected one channel, (height, width)")
    if stored.shape != fields.image_size:
        image_height, image_width = fields.image_size
        raise ValueError(f"the mask of {name} is {stored.shape[1]}x{stored.shape[0]} but its image is "
                         f"{image_width}x{image_height} (width x height); masks must cover their image pixel for "
                         "pixel: prepare the dataset again from the original archives")
    return encode_png(dataset.to_class_mask(stored, fields.label, f"the mask of {name}"))


def class_names(name: str, data_dir: str | os.PathLike) -> tuple[str, ...]:
    """The K class names of the prepared dataset `name` in `data_dir`, in label order."""
    return tuple(_builder(name, data_dir).info.features["label"].names)


def load_tfds_split(name: str, split: str, data_dir: str | os.PathLike, *,
                    workers: int | None = None) -> LabeledImages:
    """Reads split `split` of the prepared TFDS dataset `name` in `data_dir` (array_record; no TensorFlow).

    Args:
      name: "oxford_iiit_pet" (37 breeds) or "caltech_birds2011" (200 species).
      split: a TFDS split of it ("train", "test"), slices such as "train[:100]" included.
      workers: threads that convert the masks (default: one per core, at most 16).

    Returns:
      LabeledImages in the dataset's record order: the stored JPEGs (read from disk when indexed:
      `attrjax.data.RecordFeature`), (N, 2) (height, width), (N, K) one-hot labels, file stems as names and
      class masks (module docstring) as single-channel PNGs, held in memory.
    """
    builder = _builder(name, data_dir)
    _check_split(builder, split)
    dataset = DATASETS[name]
    num_classes = builder.info.features["label"].num_classes
    start = time.perf_counter()
    skip = {"image": tfds.decode.SkipDecoding(), "segmentation_mask": tfds.decode.SkipDecoding()}
    print(f"{name}/{split}: reading {builder.info.splits[split].num_examples} images and masks from "
          f"{builder.data_path}")
    remedy = (f"delete {builder.data_path} and prepare it again: `{prepare_command(name, data_dir)}` (or copy it "
              "again from where it was prepared)")
    records = prepared.read_records(builder, split, remedy, decoders=skip,
                                    keep=functools.partial(_small_fields, dataset=dataset))
    with concurrent.futures.ThreadPoolExecutor(workers or default_threads()) as pool:
        masks = list(pool.map(functools.partial(_class_mask, dataset=dataset, num_classes=num_classes), records))
    labels = np.zeros((len(records), num_classes), dtype=bool)
    labels[np.arange(len(records)), [fields.label for fields in records]] = True
    print(f"{name}/{split}: {len(records)} images in {time.perf_counter() - start:.1f} s")
    return LabeledImages(
        images=prepared.RecordFeature(builder, split, "image", remedy),
        sizes=np.array([fields.image_size for fields in records], dtype=np.int64).reshape(-1, 2),
        labels=labels,
        names=[fields.name for fields in records],
        masks=masks,
    )
