"""Tests of attrjax.data: the shapes renderer, the TFDS array_record builder and the NumPy input pipeline."""

import dataclasses
import pathlib
import re
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.data import builder, _pipeline as pipeline, _shapes as shapes
from tests import damage

TINY_SIZES = {"num_train": 16, "num_val": 8, "num_localization": 8}
TINY_SHAPES = shapes.ShapesConfig(image_size=32)
TINY = {"shapes": TINY_SHAPES, "seed": 5, **TINY_SIZES}  # the build of `tiny_data_dir`
IDENTITY = pipeline.Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _assert_splits_equal(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


# --- renderer -----------------------------------------------------------------------------------------------


def test_render_example_shapes_and_dtypes():
    config = shapes.ShapesConfig(image_size=48, num_classes=8)
    example = shapes.render_example(np.random.default_rng(0), config)
    chex.assert_shape(example["image"], (48, 48, 3))
    chex.assert_shape(example["mask"], (48, 48))
    chex.assert_shape(example["labels"], (8,))
    assert [example[key].dtype for key in ("image", "mask", "labels")] == [np.uint8, np.uint8, bool]
    assert len(shapes.CLASS_NAMES) >= 8


def test_render_is_deterministic_from_seed():
    first = shapes.render_split(TINY_SHAPES, 6, seed=3)
    _assert_splits_equal(shapes.render_split(TINY_SHAPES, 6, seed=3), first)
    assert not np.array_equal(shapes.render_split(TINY_SHAPES, 6, seed=4)["image"], first["image"])


def test_examples_do_not_depend_on_split_size():
    small, large = shapes.render_split(TINY_SHAPES, 4, seed=7), shapes.render_split(TINY_SHAPES, 11, seed=7)
    _assert_splits_equal(small, {key: value[:4] for key, value in large.items()})


def test_labels_are_the_classes_present_in_the_mask_and_objects_stay_visible():
    config = shapes.ShapesConfig(num_classes=8, max_objects=5)
    split = shapes.render_split(config, 200, seed=0)
    for mask, labels in zip(split["mask"], split["labels"]):
        areas = np.bincount(mask.ravel(), minlength=config.num_classes + 1)
        np.testing.assert_array_equal(labels, areas[1:] > 0)
        # Occlusion leaves every object a sizeable part: unoccluded objects cover at least ~80 pixels here.
        assert (areas[1:][labels] >= 40).all()
    counts = split["labels"].sum(axis=1)
    assert counts.min() >= config.min_objects and counts.max() <= config.max_objects
    assert split["labels"].any(axis=0).all()  # every class occurs


def test_context_cue_changes_only_background_pixels():
    plain = shapes.render_split(TINY_SHAPES, 20, seed=1)
    cued = shapes.render_split(dataclasses.replace(TINY_SHAPES, context_cue=1.0), 20, seed=1)
    np.testing.assert_array_equal(cued["mask"], plain["mask"])
    np.testing.assert_array_equal(cued["labels"], plain["labels"])
    changed = (cued["image"] != plain["image"]).any(axis=-1)
    assert changed.any()
    assert not (changed & (plain["mask"] > 0)).any()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_classes": len(shapes.CLASS_NAMES) + 1}, "num_classes"),
        ({"num_classes": 2, "max_objects": 3}, "max_objects"),
        ({"min_objects": 0}, "min_objects"),
        ({"min_object_size": 0.5, "max_object_size": 0.4}, "object_size"),
        ({"context_cue": 1.5}, "context_cue"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_invalid_shapes_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        shapes.ShapesConfig(**fields)


def test_render_split_rejects_out_of_range_seed():
    with pytest.raises(ValueError, match="seed"):
        shapes.render_split(TINY_SHAPES, 1, seed=-1)


def test_shapes_normalization_matches_the_renderer():
    # Pooled over channels, which the renderer treats alike; per-image background colours make a channel's
    # own mean vary by ~0.01 over a few hundred images.
    images = shapes.render_split(shapes.ShapesConfig(), 400, seed=11)["image"] / 255.0
    np.testing.assert_allclose(images.mean(), np.mean(pipeline.SHAPES_NORMALIZATION.mean), atol=0.01)
    np.testing.assert_allclose(images.std(), np.mean(pipeline.SHAPES_NORMALIZATION.std), atol=0.005)


# --- builder ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("shapes")
    builder.build_shapes(data_dir, shapes=TINY_SHAPES, seed=5, **TINY_SIZES)
    return data_dir


@pytest.mark.parametrize("split", builder.SPLITS)
def test_builder_round_trip_equals_render_split(tiny_data_dir, split):
    loaded = builder.load_split(tiny_data_dir, split, shapes=TINY_SHAPES, seed=5, **TINY_SIZES)
    num_examples = TINY_SIZES[f"num_{split}"]
    _assert_splits_equal(loaded, shapes.render_split(TINY_SHAPES, num_examples, builder.split_seed(5, split)))


def test_splits_are_distinct_and_reading_uses_no_tensorflow(tiny_data_dir):
    train, val = (builder.load_split(tiny_data_dir, split, shapes=TINY_SHAPES, seed=5, **TINY_SIZES)
                  for split in ("train", "val"))
    assert not np.array_equal(train["image"][:8], val["image"])
    assert "tensorflow" not in sys.modules


def test_build_shapes_reuses_an_existing_build(tiny_data_dir, capsys):
    built = builder.build_shapes(tiny_data_dir, shapes=TINY_SHAPES, seed=5, **TINY_SIZES)
    assert "reusing" in capsys.readouterr().out
    assert built.info.splits["train"].num_examples == TINY_SIZES["num_train"]


def test_config_names_differ_when_any_value_differs():
    base = builder.ShapesBuilderConfig(shapes=TINY_SHAPES, **TINY_SIZES)
    variants = [
        builder.ShapesBuilderConfig(shapes=TINY_SHAPES, **(TINY_SIZES | {"num_val": 9})),
        builder.ShapesBuilderConfig(shapes=TINY_SHAPES, seed=1, **TINY_SIZES),
        builder.ShapesBuilderConfig(shapes=dataclasses.replace(TINY_SHAPES, context_cue=0.5), **TINY_SIZES),
    ]
    names = {base.name, *(variant.name for variant in variants)}
    assert len(names) == 4
    assert base.name == builder.ShapesBuilderConfig(shapes=TINY_SHAPES, **TINY_SIZES).name


def test_load_split_from_missing_data_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*build_shapes"):
        builder.load_split(tmp_path / "nowhere", "train")


def test_load_split_of_unbuilt_dataset_names_a_build_command_that_works(tmp_path):
    config = shapes.ShapesConfig(image_size=32, num_classes=4, max_objects=2, context_cue=0.5)
    sizes = {"num_train": 3, "num_val": 2, "num_localization": 1}
    with pytest.raises(FileNotFoundError, match="not built .*there is no .*build_shapes") as error:
        builder.load_split(tmp_path, "val", shapes=config, seed=5, **sizes)
    damage.follow_the_advice(str(error.value), "attrjax.data.builder", builder.main)
    loaded = builder.load_split(tmp_path, "val", shapes=config, seed=5, **sizes)
    _assert_splits_equal(loaded, shapes.render_split(config, 2, builder.split_seed(5, "val")))


def test_load_split_of_unknown_split_raises(tiny_data_dir):
    with pytest.raises(ValueError, match="unknown split 'test'.*train, val, localization"):
        builder.load_split(tiny_data_dir, "test", shapes=TINY_SHAPES, seed=5, **TINY_SIZES)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(damage.truncate_to_half, id="truncated"),
        pytest.param(lambda path: path.write_bytes(b"not an array_record file"), id="overwritten"),
        pytest.param(damage.scramble_records, id="scrambled"),
        pytest.param(lambda path: path.unlink(), id="deleted"),
    ],
)
def test_load_split_of_damaged_file_names_it_and_says_rebuild(tmp_path, tiny_data_dir, spoil):
    built = builder.build_shapes(tmp_path, **TINY)
    path = pathlib.Path(built.data_path / built.info.splits["train"].filenames[0])
    spoil(path)
    with pytest.raises(ValueError, match=rf"(?s){path.name}.*delete .* build it again") as error:
        builder.load_split(tmp_path, "train", **TINY)
    builder.load_split(tmp_path, "val", **TINY)  # the intact splits still read
    damage.follow_the_advice(str(error.value), "attrjax.data.builder", builder.main)
    _assert_same_as_clean_build(tmp_path, tiny_data_dir)


def _load_all(data_dir) -> dict[str, dict[str, np.ndarray]]:
    return {split: builder.load_split(data_dir, split, **TINY) for split in builder.SPLITS}


def _assert_same_as_clean_build(data_dir, clean_data_dir):
    for split, arrays in _load_all(clean_data_dir).items():
        _assert_splits_equal(builder.load_split(data_dir, split, **TINY), arrays)


def test_folder_without_dataset_info_is_named_and_its_build_command_rebuilds_it(tmp_path, tiny_data_dir, capsys):
    # A version folder without dataset_info.json (a partial copy, a deleted file) is no build TFDS can read, yet
    # TFDS's download_and_prepare sees the folder and returns at once: it used to be "built in 0.0 s", forever.
    built = builder.build_shapes(tmp_path, **TINY)
    info = pathlib.Path(built.data_path, "dataset_info.json")
    info.unlink()
    with pytest.raises(FileNotFoundError) as error:
        builder.load_split(tmp_path, "train", **TINY)
    assert f"{info.parent} has no dataset_info.json" in str(error.value)
    capsys.readouterr()
    damage.follow_the_advice(str(error.value), "attrjax.data.builder", builder.main)
    assert f"deleting {info.parent} to build it again" in capsys.readouterr().out
    _assert_same_as_clean_build(tmp_path, tiny_data_dir)


@pytest.mark.parametrize("spoil", [pytest.param(damage.truncate_to_half, id="truncated"),
                                   pytest.param(lambda path: path.unlink(), id="deleted")])
def test_build_shapes_rebuilds_a_build_with_a_damaged_shard(tmp_path, tiny_data_dir, capsys, spoil):
    built = builder.build_shapes(tmp_path, **TINY)
    path = pathlib.Path(built.data_path / built.info.splits["val"].filenames[0])
    spoil(path)
    capsys.readouterr()
    builder.build_shapes(tmp_path, **TINY)
    output = capsys.readouterr().out
    assert str(path) in output and f"deleting {built.data_path} to build it again" in output
    _assert_same_as_clean_build(tmp_path, tiny_data_dir)


def _build_killed_at_split(data_dir, split: str) -> subprocess.CompletedProcess:
    """Runs build_shapes(data_dir, **TINY) in a process SIGKILLed (as by the OOM killer) when `split` starts."""
    script = f"""
import os, signal
from attrjax.data import builder, _shapes as shapes
generate = builder.AttrjaxShapes._generate_examples
def generate_or_die(self, split):
    if split == {split!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    yield from generate(self, split)
builder.AttrjaxShapes._generate_examples = generate_or_die
builder.build_shapes({str(data_dir)!r}, shapes=shapes.{TINY_SHAPES!r}, seed=5, **{TINY_SIZES!r})
"""
    return subprocess.run([sys.executable, "-c", script], cwd=pathlib.Path(__file__).parents[1],
                          capture_output=True, check=False)


def test_build_after_a_killed_build_rebuilds_and_deletes_its_temporary_folder(tmp_path, tiny_data_dir, capsys):
    assert _build_killed_at_split(tmp_path, "val").returncode == -signal.SIGKILL
    # TFDS wrote the train shard into incomplete.XXXXXX_1.0.0 and was killed before renaming it to 1.0.0.
    (leftover,) = tmp_path.glob("attrjax_shapes/*/incomplete.*")
    assert list(leftover.glob("attrjax_shapes-train.array_record*"))
    assert not list(tmp_path.glob("attrjax_shapes/*/1.0.0"))
    capsys.readouterr()
    builder.build_shapes(tmp_path, **TINY)
    assert f"deleting {leftover}" in capsys.readouterr().out
    assert not leftover.exists()
    _assert_same_as_clean_build(tmp_path, tiny_data_dir)


def test_build_interrupted_by_an_exception_leaves_nothing_and_the_next_build_works(tmp_path, tiny_data_dir,
                                                                                  monkeypatch):
    generate = builder.AttrjaxShapes._generate_examples

    def generate_or_interrupt(self, split):
        if split == "val":
            raise KeyboardInterrupt
        yield from generate(self, split)

    monkeypatch.setattr(builder.AttrjaxShapes, "_generate_examples", generate_or_interrupt)
    with pytest.raises(KeyboardInterrupt):
        builder.build_shapes(tmp_path, **TINY)
    assert not list(tmp_path.glob("attrjax_shapes/*/*"))  # TFDS removed its temporary folder
    monkeypatch.undo()
    builder.build_shapes(tmp_path, **TINY)
    _assert_same_as_clean_build(tmp_path, tiny_data_dir)


def test_a_build_that_writes_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builder.AttrjaxShapes, "download_and_prepare", lambda self, **kwargs: None)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(tmp_path))}.*there is no .*1\.0\.0"):
        builder.build_shapes(tmp_path, **TINY)


def test_builder_config_rejects_empty_split():
    with pytest.raises(ValueError, match="num_val"):
        builder.ShapesBuilderConfig(num_val=0)


# --- pipeline -----------------------------------------------------------------------------------------------


def _coordinate_arrays(num_examples=10, size=16, num_classes=3):
    """Images whose channels encode (example, row, column) and masks that encode (row + column) mod 7."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    example = np.broadcast_to(np.arange(num_examples)[:, None, None], (num_examples, size, size))
    image = np.stack([example, *np.broadcast_arrays(rows, cols, example)[:2]], axis=-1)
    labels = np.arange(num_examples * num_classes).reshape(num_examples, num_classes) % 2 == 0
    mask = np.broadcast_to((rows + cols) % 7, example.shape)
    return {"image": image.astype(np.uint8), "mask": mask.astype(np.uint8), "labels": labels}


def _pixels(batch_images):
    """Undoes IDENTITY normalisation: float32 (B, H, W, 3) -> int (B, H, W, 3)."""
    return np.rint(batch_images * 255).astype(int)


def test_normalize_matches_the_definition():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    norm = pipeline.VOC_NORMALIZATION
    expected = (images / 255.0 - np.array(norm.mean)) / np.array(norm.std)
    normalized = pipeline.normalize(images, norm)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        pipeline.normalize(images.astype(np.float32), norm)


def test_augmentation_crops_and_flips_image_and_mask_together():
    size, padding = 16, 4
    arrays = _coordinate_arrays(size=size)
    padded = np.pad(np.arange(size), padding, mode="reflect")
    windows = [padded[offset:offset + size] for offset in range(2 * padding + 1)]
    batches = pipeline.train_batches(
        arrays, 5, seed=0, num_steps=8, normalization=IDENTITY, crop_padding=padding
    )
    flipped_any = shifted_any = False
    for batch in batches:
        pixels = _pixels(batch["image"])
        for image, mask in zip(pixels, batch["mask"]):
            source_rows, source_cols = image[:, 0, 1], image[0, :, 2]
            # Every output pixel comes from one source row and one source column of the same example.
            np.testing.assert_array_equal(image[..., 1], np.broadcast_to(source_rows[:, None], (size, size)))
            np.testing.assert_array_equal(image[..., 2], np.broadcast_to(source_cols[None, :], (size, size)))
            assert len(np.unique(image[..., 0])) == 1
            # Rows are a reflect-padded crop window; columns are one too, possibly reversed (the flip).
            assert any(np.array_equal(source_rows, window) for window in windows)
            flipped = not any(np.array_equal(source_cols, window) for window in windows)
            if flipped:
                assert any(np.array_equal(source_cols[::-1], window) for window in windows)
            flipped_any |= flipped
            shifted_any |= not np.array_equal(source_rows, np.arange(size))
            # The mask went through exactly the same crop and flip.
            np.testing.assert_array_equal(mask, (source_rows[:, None] + source_cols[None, :]) % 7)
    assert flipped_any and shifted_any


def test_train_batches_shapes_and_epochs():
    arrays = _coordinate_arrays(num_examples=10)
    batches = list(
        pipeline.train_batches(arrays, 4, seed=3, num_steps=6, normalization=IDENTITY, augment=False)
    )
    assert len(batches) == 6
    for batch in batches:
        chex.assert_shape(batch["image"], (4, 16, 16, 3))
        chex.assert_shape(batch["mask"], (4, 16, 16))
        chex.assert_shape(batch["labels"], (4, 3))
        assert [batch[key].dtype for key in ("image", "labels", "mask")] == [np.float32, np.float32, np.uint8]
    examples = [_pixels(batch["image"])[:, 0, 0, 0] for batch in batches]
    for batch, example in zip(batches, examples):
        np.testing.assert_array_equal(batch["labels"], arrays["labels"][example].astype(np.float32))
    # 10 examples in batches of 4: two full batches per epoch, 8 distinct examples, a new order each epoch.
    epochs = [np.concatenate(examples[start:start + 2]) for start in (0, 2, 4)]
    assert all(len(set(epoch)) == 8 for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


def test_resumed_train_batches_equal_the_uninterrupted_run():
    arrays = _coordinate_arrays(num_examples=10)
    kwargs = dict(seed=9, normalization=pipeline.SHAPES_NORMALIZATION)
    uninterrupted = list(pipeline.train_batches(arrays, 3, num_steps=12, **kwargs))
    resumed = list(pipeline.train_batches(arrays, 3, start_step=7, num_steps=5, **kwargs))
    for expected, actual in zip(uninterrupted[7:], resumed, strict=True):
        chex.assert_trees_all_equal(actual, expected)
    other_seed = next(pipeline.train_batches(arrays, 3, seed=10, normalization=pipeline.SHAPES_NORMALIZATION))
    assert not np.array_equal(other_seed["image"], uninterrupted[0]["image"])
    # Processes that each build their rows of a batch build the same global batch together.
    parts = [list(pipeline.train_batches(arrays, 3, num_steps=12, rows=rows, **kwargs))
             for rows in (slice(0, 1), slice(1, 3))]
    for expected, *rows in zip(uninterrupted, *parts, strict=True):
        chex.assert_trees_all_equal(jax.tree.map(lambda *part: np.concatenate(part), *rows), expected)


def test_eval_batches_pad_the_last_batch_and_mark_it():
    arrays = _coordinate_arrays(num_examples=10)
    batches = list(pipeline.eval_batches(arrays, 4, normalization=IDENTITY))
    assert len(batches) == 3

    @jax.jit
    @chex.assert_max_traces(n=1)
    def masked_label_count(batch):
        return jnp.sum(batch["labels"] * batch["valid"][:, None])

    counts = [masked_label_count(batch) for batch in batches]  # the padded batch does not retrace
    assert sum(int(count) for count in counts) == arrays["labels"].sum()
    for batch in batches:
        chex.assert_shape(batch["image"], (4, 16, 16, 3))
        chex.assert_shape(batch["valid"], (4,))
        assert batch["valid"].dtype == bool
    np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
    valid = {key: np.concatenate([batch[key][batch["valid"]] for batch in batches]) for key in batches[0]}
    np.testing.assert_array_equal(_pixels(valid["image"]), arrays["image"])
    np.testing.assert_array_equal(valid["mask"], arrays["mask"])
    np.testing.assert_array_equal(valid["labels"], arrays["labels"].astype(np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.eval_batches(arrays, 0, normalization=IDENTITY)
    # Three processes' shares: contiguous blocks of 4, 4, 2 examples, one batch each, in order when gathered.
    shares = [list(pipeline.eval_batches(arrays, 4, normalization=IDENTITY, shard=(index, 3))) for index in range(3)]
    assert [len(share) for share in shares] == [1, 1, 1]
    gathered = jax.tree.map(lambda *part: np.concatenate(part), *[share[0] for share in shares])
    np.testing.assert_array_equal(_pixels(gathered["image"][gathered["valid"]]), arrays["image"])
    with pytest.raises(ValueError, match="shard must be"):
        pipeline.eval_batches(arrays, 4, normalization=IDENTITY, shard=(3, 3))


@pytest.mark.parametrize(
    "arrays_change, kwargs, message",
    [
        (lambda arrays: arrays, {"batch_size": 11}, "exceeds"),
        (lambda arrays: arrays, {"batch_size": 0}, "batch_size"),
        (lambda arrays: arrays, {"crop_padding": 16}, "crop_padding"),
        (lambda arrays: {"image": arrays["image"], "labels": arrays["labels"]}, {}, "missing mask"),
        (lambda arrays: arrays | {"labels": arrays["labels"][:5]}, {}, "same number"),
    ],
)
def test_train_batches_rejects_bad_arguments_when_called(arrays_change, kwargs, message):
    arrays = arrays_change(_coordinate_arrays(num_examples=10))
    with pytest.raises(ValueError, match=message):
        pipeline.train_batches(arrays, **({"batch_size": 4} | kwargs), seed=0, normalization=IDENTITY)
