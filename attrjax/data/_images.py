"""Datasets of natural images of any size (PASCAL VOC, Oxford-IIIT Pet, CUB): the paper's preprocessing (§4).

A split is a `LabeledImages`: encoded (JPEG/PNG) images, their sizes, multi-hot labels and optional encoded class
masks. The images of a prepared dataset (`load_voc`, `load_tfds_split`) stay in its array_record files and are read
one record at a time where a batch draws them (`attrjax.data.RecordFeature`): a split of any size costs
the memory of its labels. Two ways out:

- `random_resized_crop_batches`: training batches as torchvision's RandomResizedCrop(S) + RandomHorizontalFlip
  (scale (0.08, 1), ratio (3/4, 4/3), bilinear), decoded on a thread pool. Batch `step` is a pure function of
  (split, seed, step), as in `pipeline.train_batches`, so resumed runs see the same batches.
- `resize_split`: every image resized to S x S (bilinear, aspect ratio not kept) and every mask with nearest
  neighbour, as in-memory arrays for `pipeline.eval_batches` and the evaluation.

Masks hold 0 for background, c + 1 for class c and `VOID` (255) for pixels nobody labelled, which belong to no class.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import math
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from attrjax.data._loader import default_threads, step_stream
from attrjax.data._pipeline import Normalization, epoch_indices, normalized

VOID = 255
"""The mask value of pixels nobody labelled (object borders): they belong to no class."""
# Entropy words of the crop streams; distinct from pipeline.py's so the two pipelines never share draws.
_ORDER_STREAM = 0x1E2F3A4B
_CROP_STREAM = 0x5C6D7E8F


@dataclasses.dataclass(frozen=True)
class LabeledImages:
    """One split of a natural-image dataset, images still encoded.

    Attributes:
      images: N encoded images (JPEG or PNG bytes), any size, RGB or greyscale: a list, or a sequence that reads
        them from disk when indexed (`attrjax.data.RecordFeature`).
      sizes: (N, 2) int (height, width) of each image.
      labels: (N, K) bool multi-hot (one-hot for single-label datasets).
      names: N identifiers (file stems), for error messages and reports.
      masks: None, or N encoded single-channel PNGs of each image's size (0 background, c + 1 class c, 255 void).
    """

    images: Sequence[bytes]
    sizes: np.ndarray
    labels: np.ndarray
    names: Sequence[str]
    masks: Sequence[bytes] | None = None

    def __post_init__(self):
        lengths = {"images": len(self.images), "sizes": len(self.sizes), "labels": len(self.labels),
                   "names": len(self.names)}
        if self.masks is not None:
            lengths["masks"] = len(self.masks)
        if len(set(lengths.values())) != 1:
            raise ValueError(f"every field of LabeledImages needs one entry per image, got {lengths}")
        if self.labels.ndim != 2 or self.labels.dtype != np.bool_:
            raise ValueError(f"labels must be bool (N, K), got {self.labels.dtype} {self.labels.shape}")
        if np.shape(self.sizes) != (len(self.images), 2):
            raise ValueError(f"sizes must be (N, 2) (height, width), got {np.shape(self.sizes)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return self.labels.shape[1]


def decode_rgb(encoded: bytes, name: str = "image") -> Image.Image:
    """Encoded JPEG/PNG -> a fully loaded RGB PIL image; a damaged file raises ValueError naming it."""
    try:
        image = Image.open(io.BytesIO(encoded))
        image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} cannot be decoded ({error}); the file is truncated or not an image: "
                         "replace it from the original archive") from error
    return image.convert("RGB")


def decode_mask(encoded: bytes, name: str = "mask") -> np.ndarray:
    """Encoded single-channel PNG -> (H, W) uint8 class indices."""
    try:
        mask = Image.open(io.BytesIO(encoded))
        mask.load()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{name} cannot be decoded ({error}); rebuild the dataset") from error
    return np.asarray(mask, dtype=np.uint8)


def encode_png(mask: np.ndarray) -> bytes:
    """(H, W) uint8 class indices -> single-channel PNG bytes (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, *,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) drawn as torchvision's RandomResizedCrop.get_params.

    Ten tries at an area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`; if none fits, the
    largest centred crop whose aspect ratio is clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_height, crop_width = height, round(height * ratio[1])
    else:
        crop_height, crop_width = height, width
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _crop_resize_flip(encoded: bytes, name: str, box: tuple[int, int, int, int], flip: bool,
                      image_size: int) -> np.ndarray:
    top, left, crop_height, crop_width = box
    # Crop, then resize: PIL's resize(box=...) would blend in pixels outside the box at its edges.
    image = decode_rgb(encoded, name).crop((left, top, left + crop_width, top + crop_height))
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, ::-1] if flip else pixels


def random_resized_crop_batches(
    split: LabeledImages,
    batch_size: int,
    *,
    image_size: int,
    seed: int,
    normalization: Normalization,
    start_step: int = 0,
    num_steps: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rows: slice = slice(None),
    workers: int = 0,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields training batches for steps start_step, start_step + 1, ... (forever when num_steps is None).

    Each epoch visits a fresh permutation of the images in full batches (the last N mod B sit that epoch out).
    Every image is cropped to a RandomResizedCrop box, resized to `image_size` (bilinear, antialiased as PIL
    resizes) and flipped horizontally with probability 1/2. `rows`: the rows of every batch to decode (a
    process's, as in `train_batches`); the others' boxes are drawn and skipped. `workers` (processes) and
    `threads` (batches decoded at once per process, and as many held ready): how grain builds the batches
    ahead.

    Yields:
      dict with `image` float32 (R, S, S, 3) normalised and `labels` float32 (R, K), R the number of `rows`.
    """
    if batch_size < 1 or batch_size > len(split):
        raise ValueError(f"batch_size must be in [1, {len(split)}] for {len(split)} images, got {batch_size}")
    if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got scale={scale}, "
                         f"ratio={ratio}")
    batch_fn = ResizedCrops(split, batch_size, image_size, seed, scale, ratio, rows)
    return step_stream(batch_fn, start_step, num_steps, workers=workers, threads=threads,
                       finish=functools.partial(normalized, normalization=normalization))


@dataclasses.dataclass(frozen=True, eq=False)
class ResizedCrops:
    """Training batch ``step`` of encoded images (see ``random_resized_crop_batches``), images still uint8: a pure
    function of the step."""

    split: LabeledImages
    batch_size: int
    image_size: int
    seed: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    rows: slice

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        indices = epoch_indices(len(self.split), self.batch_size, self.seed, step, _ORDER_STREAM)
        rng = np.random.default_rng([self.seed, _CROP_STREAM, step])
        boxes = [random_resized_crop_box(rng, *self.split.sizes[i], scale=self.scale, ratio=self.ratio)
                 for i in indices]
        flips = rng.random(self.batch_size) < 0.5
        indices, boxes, flips = indices[self.rows], boxes[self.rows], flips[self.rows]
        pixels = [_crop_resize_flip(self.split.images[i], self.split.names[i], box, flip, self.image_size)
                  for i, box, flip in zip(indices, boxes, flips)]
        return {"image": np.stack(pixels),
                "labels": self.split.labels[indices].astype(np.float32)}


def _resize_image(encoded: bytes, name: str, image_size: int) -> np.ndarray:
    image = decode_rgb(encoded, name).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _resize_mask(encoded: bytes, name: str, image_size: int) -> np.ndarray:
    mask = Image.fromarray(decode_mask(encoded, name), mode="L")
    return np.asarray(mask.resize((image_size, image_size), Image.Resampling.NEAREST), dtype=np.uint8)


def present_classes(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, H, W) class-index masks -> (N, K) bool, True where class k has a pixel (void and background do not count)."""
    present = np.zeros((len(masks), num_classes), dtype=bool)
    for n, mask in enumerate(masks):
        values = np.unique(mask)
        values = values[(values >= 1) & (values <= num_classes)]
        present[n, values - 1] = True
    return present


def resize_split(split: LabeledImages, image_size: int, *, labels_from_masks: bool = False,
                 workers: int | None = None) -> dict[str, np.ndarray]:
    """Decodes and resizes every image to (image_size, image_size) for evaluation.

    Args:
      labels_from_masks: label an image with the classes that keep a pixel in its resized mask (the paper's
        localisation protocol, docs/method.md#data-and-preprocessing) instead of its annotation labels.

    Returns:
      dict with `image` uint8 (N, S, S, 3) and `labels` bool (N, K), plus `mask` uint8 (N, S, S) when the split
      has masks.
    """
    with concurrent.futures.ThreadPoolExecutor(workers or default_threads()) as pool:
        images = np.stack(list(pool.map(_resize_image, split.images, split.names, [image_size] * len(split))))
        arrays = {"image": images, "labels": split.labels}
        if split.masks is not None:
            arrays["mask"] = np.stack(list(pool.map(_resize_mask, split.masks, split.names,
                                                    [image_size] * len(split))))
    if labels_from_masks:
        if split.masks is None:
            raise ValueError("labels_from_masks needs a split with masks")
        arrays["labels"] = present_classes(arrays["mask"], split.num_classes)
    return arrays
