"""Input pipeline in NumPy: shuffled, augmented training batches and padded evaluation batches.

Both take a split as a dict of arrays, `image` uint8 (N, H, W, 3), `mask` uint8 (N, H, W) and `labels` bool
(N, K), as `load_split` returns it. Training batch `step` is a pure function of (arrays, seed, step): epochs
are permutations drawn from (seed, epoch) and augmentation from (seed, step), so a run resumed at step s sees
the same batches as one that never stopped.
"""

import dataclasses
import functools
from typing import Iterator, Mapping

import numpy as np

from attrjax.data._loader import step_stream

# Entropy words that keep the pipeline's random streams apart from each other and from the renderer's
# (seed, index) streams, which use small second words.
_ORDER_STREAM = 0x0D0E0F10
_AUGMENT_STREAM = 0x0A0B0C0D
_SPLIT_KEYS = ("image", "mask", "labels")


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of images scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"need 3 channel means and stds, got mean={self.mean}, std={self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"standard deviations must be positive, got {self.std}")


SHAPES_NORMALIZATION = Normalization(mean=(0.5, 0.5, 0.5), std=(0.235, 0.235, 0.235))
"""The synthetic dataset's: colours are drawn symmetrically about 0.5 in every channel, so the mean is 0.5 by
design; the standard deviation is measured on 6000 default renders."""
VOC_NORMALIZATION = Normalization(mean=(0.4589, 0.4355, 0.4032), std=(0.2239, 0.2186, 0.2206))
"""The paper's PASCAL VOC constants (docs/method.md#data-and-preprocessing)."""
IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""torchvision's ImageNet constants, for ImageNet-pretrained teachers fine-tuned on Oxford-IIIT Pet or CUB."""


def normalize(images: np.ndarray, normalization: Normalization) -> np.ndarray:
    """uint8 images (..., H, W, 3) -> float32 (..., H, W, 3), (images / 255 - mean) / std."""
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise TypeError(f"normalize expects uint8 images (..., H, W, 3), got {images.dtype} {images.shape}")
    std = np.asarray(normalization.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    offset = -np.asarray(normalization.mean, dtype=np.float32) / std
    # Rows of W * 3 values keep NumPy's inner loops long; broadcasting against (3,) is ~15x slower.
    width = images.shape[-2]
    rows = images.reshape(-1, width * 3).astype(np.float32)
    rows *= np.tile(scale, width)
    rows += np.tile(offset, width)
    return rows.reshape(images.shape)


def _num_examples(arrays: Mapping[str, np.ndarray], required: tuple[str, ...] = _SPLIT_KEYS) -> int:
    """N, after checking that `arrays` holds the `required` keys, all of one leading length."""
    missing = [key for key in required if key not in arrays]
    if missing:
        raise ValueError(f"arrays must hold {', '.join(required)}; missing {', '.join(missing)}")
    lengths = {key: len(arrays[key]) for key in _SPLIT_KEYS if key in arrays}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{', '.join(lengths)} must have the same number of examples, got {lengths}")
    return lengths["image"]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _reflect(indices: np.ndarray, size: int) -> np.ndarray:
    """Maps indices into [0, size) by mirroring at the edges without repeating them, like np.pad 'reflect'."""
    period = 2 * (size - 1)
    indices = np.mod(indices, period)
    return np.where(indices >= size, period - indices, indices)


def _augmented_indices(
    rng: np.random.Generator, batch_size: int, height: int, width: int, crop_padding: int
) -> tuple[np.ndarray, np.ndarray]:
    """(B, H) source rows and (B, W) source columns of random reflect-padded crops, randomly flipped."""
    offsets = rng.integers(0, 2 * crop_padding + 1, size=(batch_size, 2))
    flips = rng.random(batch_size) < 0.5
    rows = _reflect(offsets[:, :1] + np.arange(height) - crop_padding, height)
    cols = _reflect(offsets[:, 1:] + np.arange(width) - crop_padding, width)
    return rows, np.where(flips[:, None], cols[:, ::-1], cols)


def train_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int,
    normalization: Normalization,
    start_step: int = 0,
    num_steps: int | None = None,
    augment: bool = True,
    crop_padding: int = 4,
    rows: slice = slice(None),
    workers: int = 0,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields training batches for steps start_step, start_step + 1, ... (forever when num_steps is None).

    Each epoch visits a fresh permutation of the examples in full batches only (the last N mod B are left out
    of that epoch). Augmentation crops an H x W window from the image reflect-padded by `crop_padding` and
    flips it horizontally with probability 1/2; the mask gets the same crop and flip.

    `rows`: the rows of every batch to produce, e.g. this process's (`attrjax.training.process_rows`) in a
    multi-process run. Every process draws the same order and augmentation, so the global batch is the same
    however many processes share it, and each builds only its rows. `workers`, `threads`: how grain builds the
    batches ahead (`workers` processes; `threads` batches built at once in each, and as many held ready).

    Yields:
      dict with `image` float32 (R, H, W, 3) normalised, `labels` float32 (R, K), `mask` uint8 (R, H, W), R the
      number of `rows` (B by default).
    """
    num_examples = _num_examples(arrays)
    _check_batch_size(batch_size)
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples; no full batch exists")
    height, width = arrays["image"].shape[1:3]
    if augment and not 0 <= crop_padding < min(height, width):
        raise ValueError(f"crop_padding must be in [0, {min(height, width)}) for {height}x{width} images")
    # Contiguous, so that the flat views of ArrayCrops are views and not copies of the whole split every step.
    images, masks, labels = (np.ascontiguousarray(arrays[key]) for key in _SPLIT_KEYS)
    batch_fn = ArrayCrops(images, masks, labels, batch_size, seed, augment, crop_padding, rows)
    return step_stream(batch_fn, start_step, num_steps, workers=workers, threads=threads,
                       finish=functools.partial(normalized, normalization=normalization))


def normalized(batch: dict[str, np.ndarray], normalization: Normalization) -> dict[str, np.ndarray]:
    """``batch`` with its uint8 ``image`` normalised (``normalize``)."""
    return {**batch, "image": normalize(batch["image"], normalization)}


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayCrops:
    """Training batch ``step`` of in-memory arrays (see ``train_batches``), images still uint8: a pure function of
    the step."""

    images: np.ndarray  # (N, H, W, 3) uint8, contiguous
    masks: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N, K)
    batch_size: int
    seed: int
    augment: bool
    crop_padding: int
    rows: slice

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        num_examples, height, width = self.images.shape[:3]
        indices = epoch_indices(num_examples, self.batch_size, self.seed, step)
        if self.augment:
            rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step])
            source_rows, source_cols = (pixels[self.rows] for pixels in
                                        _augmented_indices(rng, self.batch_size, height, width, self.crop_padding))
            indices = indices[self.rows]
            # Flat pixel index (R, H, W) of each output pixel's source; np.take on it is ~5x faster than
            # indexing with three broadcast index arrays.
            source_pixels = ((indices[:, None] * height + source_rows)[:, :, None] * width
                             + source_cols[:, None, :])
            batch_images = np.take(self.images.reshape(-1, 3), source_pixels, axis=0)
            batch_masks = np.take(self.masks.reshape(-1), source_pixels)
        else:
            indices = indices[self.rows]
            batch_images, batch_masks = self.images[indices], self.masks[indices]
        return {
            "image": batch_images,
            "labels": self.labels[indices].astype(np.float32),
            "mask": batch_masks,
        }


def epoch_indices(num_examples: int, batch_size: int, seed: int, step: int, stream: int = _ORDER_STREAM
                  ) -> np.ndarray:
    """The (B,) example indices of batch ``step``: the step's slice of its epoch's permutation, drawn from (seed,
    ``stream``, epoch); each epoch has N // B full batches."""
    steps_per_epoch = num_examples // batch_size
    order = np.random.default_rng([seed, stream, step // steps_per_epoch]).permutation(num_examples)
    position = step % steps_per_epoch
    return order[position * batch_size:(position + 1) * batch_size]


def eval_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, *, normalization: Normalization,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the examples in order, unaugmented, in batches of exactly `batch_size`.

    The last batch is padded with copies of example 0; `valid` marks the real examples, so a jitted
    evaluation sees one shape throughout and never retraces. `mask` is optional (classification-only splits).

    `shard=(index, count)`: only the index-th of `count` contiguous blocks of ceil(N / count) examples, e.g. this
    process's share in a multi-process run (`attrjax.distributed.process_shard()`); every block yields the same
    number of batches, so the processes run the same number of evaluation steps, and their rows gathered in
    process order (`attrjax.distributed.gather_rows`) are the split in order.

    Yields:
      dict with `image` float32 (B, H, W, 3) normalised, `labels` float32 (B, K), `valid` bool (B,), and
      `mask` uint8 (B, H, W) when `arrays` has masks.
    """
    num_examples = _num_examples(arrays, required=("image", "labels"))
    _check_batch_size(batch_size)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    block = -(-num_examples // count)
    start, stop = min(index * block, num_examples), min((index + 1) * block, num_examples)
    return _eval_batch_stream(arrays, start, stop, -(-block // batch_size), batch_size, normalization)


def _eval_batch_stream(
    arrays: Mapping[str, np.ndarray], start: int, stop: int, num_batches: int, batch_size: int,
    normalization: Normalization
) -> Iterator[dict[str, np.ndarray]]:
    for first in range(start, start + num_batches * batch_size, batch_size):
        positions = np.arange(first, first + batch_size)
        valid = positions < stop
        indices = np.where(valid, positions, 0)
        batch = {
            "image": normalize(arrays["image"][indices], normalization),
            "labels": arrays["labels"][indices].astype(np.float32),
            "valid": valid,
        }
        if "mask" in arrays:
            batch["mask"] = arrays["mask"][indices]
        yield batch
