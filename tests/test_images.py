"""The natural-image pipeline: RandomResizedCrop boxes, crop batches, evaluation resizing, present classes."""

import io
import math

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from attrjax.data import VOC_NORMALIZATION, normalize
from attrjax.data._images import (VOID, LabeledImages, encode_png, present_classes, random_resized_crop_batches,
                                 random_resized_crop_box, resize_split)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless, so pixels can be compared exactly
    return buffer.getvalue()


def _split(num_images=6, height=30, width=50, num_classes=4) -> LabeledImages:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(num_images)]
    labels = np.eye(num_classes, dtype=bool)[np.arange(num_images) % num_classes]
    return LabeledImages(images=[_jpeg(p) for p in pixels], sizes=np.array([(height, width)] * num_images),
                         labels=labels, names=[f"img{i}" for i in range(num_images)])


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (40, 400), (400, 40)])
def test_crop_boxes_stay_inside_and_respect_scale_and_ratio(height, width):
    rng = np.random.default_rng(1)
    for _ in range(300):
        top, left, crop_height, crop_width = random_resized_crop_box(rng, height, width)
        assert 0 <= top and top + crop_height <= height and 0 <= left and left + crop_width <= width
        if crop_height * crop_width < height * width:  # drawn, not the centred fallback
            # Rounding each side to whole pixels moves area and aspect ratio by at most about one pixel per side.
            fraction = crop_height * crop_width / (height * width)
            assert fraction >= 0.08 - 2 * (crop_height + crop_width) / (height * width)
            slack = 1 / min(crop_height, crop_width)
            assert 3 / 4 * (1 - slack) ** 2 <= crop_width / crop_height <= 4 / 3 * (1 + slack) ** 2


def test_crop_box_falls_back_to_the_clamped_centre_crop():
    # With a scale range above 1 nothing fits, so the box is the centred crop of aspect ratio clamped to [3/4, 4/3].
    box = random_resized_crop_box(np.random.default_rng(0), 40, 400, scale=(1.5, 2.0))
    assert box == (0, (400 - round(40 * 4 / 3)) // 2, 40, round(40 * 4 / 3))
    assert random_resized_crop_box(np.random.default_rng(0), 30, 30, scale=(1.5, 2.0)) == (0, 0, 30, 30)


def test_crop_area_fraction_follows_the_rejection_rule():
    rng = np.random.default_rng(2)
    fractions = [np.prod(random_resized_crop_box(rng, 1000, 1000)[2:]) / 1e6 for _ in range(4000)]
    # On a square image a draw (area fraction u ~ U(0.08, 1), log aspect a ~ U(log 3/4, log 4/3)) fits iff
    # u <= min(a, 1/a); accepted draws have mean E[u 1{fits}] / P(fits), integrated here on a grid over a.
    aspects = np.exp(np.linspace(np.log(3 / 4), np.log(4 / 3), 10001))
    limits = np.minimum(aspects, 1 / aspects)
    accepted_mass = (limits - 0.08) / 0.92
    accepted_mean_times_mass = (limits**2 - 0.08**2) / 2 / 0.92
    expected = accepted_mean_times_mass.mean() / accepted_mass.mean()
    assert abs(np.mean(fractions) - expected) < 0.015, (np.mean(fractions), expected)
    assert min(fractions) >= 0.079


def test_crop_batches_are_reproducible_and_resume_exactly():
    split = _split()
    options = dict(image_size=16, seed=3, normalization=VOC_NORMALIZATION)
    full = list(random_resized_crop_batches(split, 4, num_steps=4, **options))
    resumed = list(random_resized_crop_batches(split, 4, start_step=2, num_steps=2, **options))
    chex.assert_trees_all_equal(full[2:], resumed)
    # Two grain worker processes build the same batches, in order.
    chex.assert_trees_all_equal(list(random_resized_crop_batches(split, 4, num_steps=4, workers=2, **options)), full)
    halves = [list(random_resized_crop_batches(split, 4, num_steps=4, rows=rows, **options))
              for rows in (slice(0, 2), slice(2, 4))]
    for expected, first, second in zip(full, *halves, strict=True):  # each process decodes only its rows
        chex.assert_trees_all_equal(jax.tree.map(lambda *part: np.concatenate(part), first, second), expected)
    chex.assert_shape(full[0]["image"], (4, 16, 16, 3))
    assert full[0]["image"].dtype == np.float32
    other_seed = next(random_resized_crop_batches(split, 4, num_steps=1, **(options | {"seed": 4})))
    assert not np.allclose(other_seed["image"], full[0]["image"])
    # Every epoch (6 // 4 = 1 step) draws a fresh permutation; labels follow their images.
    for batch in full:
        assert batch["labels"].shape == (4, 4) and (batch["labels"].sum(axis=1) == 1).all()


def test_crop_batch_pixels_are_the_pil_resize_of_the_drawn_box():
    split = _split(num_images=1, height=30, width=50)
    batch = next(random_resized_crop_batches(split, 1, image_size=12, seed=0, normalization=VOC_NORMALIZATION))
    # Redraw the same box and flip from the documented stream and rebuild the pixels with PIL directly.
    rng = np.random.default_rng([0, 0x5C6D7E8F, 0])
    top, left, crop_height, crop_width = random_resized_crop_box(rng, 30, 50)
    flip = rng.random(1)[0] < 0.5
    image = Image.open(io.BytesIO(split.images[0])).convert("RGB")
    expected = np.asarray(image.crop((left, top, left + crop_width, top + crop_height)).resize((12, 12),
                                                                                              Image.BILINEAR))
    expected = expected[:, ::-1] if flip else expected
    chex.assert_trees_all_close(batch["image"][0], normalize(expected, VOC_NORMALIZATION), atol=1e-5)


def test_bad_crop_arguments():
    split = _split()
    with pytest.raises(ValueError, match="batch_size must be in"):
        random_resized_crop_batches(split, 7, image_size=8, seed=0, normalization=VOC_NORMALIZATION)
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop_batches(split, 2, image_size=8, seed=0, normalization=VOC_NORMALIZATION, scale=(0, 1))


def test_labeled_images_checks_its_fields():
    with pytest.raises(ValueError, match="one entry per image"):
        LabeledImages(images=[b""] * 2, sizes=np.zeros((2, 2), int), labels=np.zeros((3, 4), bool), names=["a", "b"])
    with pytest.raises(ValueError, match="labels must be bool"):
        LabeledImages(images=[b""], sizes=np.zeros((1, 2), int), labels=np.zeros((1, 4)), names=["a"])


def test_present_classes_ignores_background_and_void():
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, 0, 0] = 2
    masks[1] = VOID
    masks[2, :2] = 1
    masks[2, 2:] = 3
    chex.assert_trees_all_equal(present_classes(masks, 3),
                                np.array([[0, 1, 0], [0, 0, 0], [1, 0, 1]], bool))


def test_resize_split_of_a_split_with_masks():
    split = _split(num_images=2, height=8, width=6)
    masks = [np.full((8, 6), VOID, np.uint8), np.pad(np.full((4, 2), 3, np.uint8), ((2, 2), (2, 2)))]
    split = LabeledImages(images=split.images, sizes=split.sizes, labels=split.labels, names=split.names,
                          masks=[encode_png(m) for m in masks])
    arrays = resize_split(split, 12, labels_from_masks=True)
    chex.assert_shape(arrays["mask"], (2, 12, 12))
    assert set(np.unique(arrays["mask"][1])) == {0, 3}
    chex.assert_trees_all_equal(arrays["labels"], np.array([[0, 0, 0, 0], [0, 0, 1, 0]], bool))
    assert math.isclose((arrays["mask"][1] == 3).mean(), (masks[1] == 3).mean())
