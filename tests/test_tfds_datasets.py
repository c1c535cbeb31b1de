"""Tests for attrjax.data._tfds_datasets on tiny prepared copies of oxford_iiit_pet and caltech_birds2011.

`tfds.testing.mock_data` is not used: in data-source mode it replaces `as_data_source` and the features'
deserialisation with random examples, so neither the on-disk reading nor realistic masks would be tested. Instead
each fixture writes a few real JPEG/PNG files in the dataset's original archive layout and runs TFDS's own builder
(`_split_generators` and `_generate_examples`) on them into array_record files, as `tfds build` does. Only what needs
the internet or TensorFlow is replaced: the download manager (it hands out the local tree), and for
caltech_birds2011 `tf.io.gfile`, OpenCV's greyscale `imdecode` and the PNG encoder of ndarray images (PIL, lossless,
so the stored pixels are the same as TensorFlow's).
"""

import contextlib
import io
import json
import os
import shutil
import sys
import tarfile
import types
from unittest import mock

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.features import image_feature
from tensorflow_datasets.image_classification import caltech_birds

from attrjax.data._images import VOID, decode_mask
from attrjax.data._tfds_datasets import cub_segmentation_to_mask, load_tfds_split, pet_trimap_to_mask
from tests import damage

# (file stem, class index, split as in the archive's list files, (height, width)); none is in the pet builder's
# _CORRUPT_SAMPLES, which it re-encodes with TensorFlow.
PET_EXAMPLES = [
    ("Abyssinian_1", 0, "trainval", (21, 30)),
    ("american_bulldog_10", 1, "trainval", (17, 25)),
    ("yorkshire_terrier_3", 36, "trainval", (24, 19)),
    ("pug_7", 25, "test", (20, 20)),
    ("Bengal_2", 5, "test", (16, 28)),
]
CUB_EXAMPLES = [
    ("001.Black_footed_Albatross", "Black_Footed_Albatross_0001_796111", 1, (22, 31)),
    ("002.Laysan_Albatross", "Laysan_Albatross_0002_1027", 1, (18, 26)),
    ("200.Common_Yellowthroat", "Common_Yellowthroat_0003_190521", 0, (25, 20)),
]
# The soft values of CUB segmentations (shares of annotators), either side of the threshold.
CUB_VALUES = np.array([0, 51, 102, 127, 128, 153, 204, 255], dtype=np.uint8)
PREPARE = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False)


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_png(path: str, pixels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


def _every_value(rng: np.random.Generator, values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 drawn from `values`, each of which appears at least once."""
    pixels = rng.choice(values, size=size).astype(np.uint8)
    pixels.flat[:len(values)] = values
    return pixels


@contextlib.contextmanager
def _offline_download_manager(**methods):
    """Makes `download_and_prepare` use a download manager with `methods` instead of downloading."""
    fake = types.SimpleNamespace(downloaded_size=0, **methods)
    with mock.patch.object(tfds.core.DatasetBuilder, "_make_download_manager", lambda self, **kwargs: fake):
        yield


def prepare_pet(root, trimap_sizes: dict[str, tuple[int, int]] | None = None) -> tuple[str, dict]:
    """Prepares oxford_iiit_pet from PET_EXAMPLES in `root`/tfds; returns (data_dir, {stem: what was written}).

    `trimap_sizes` gives some examples a trimap of another size than their image.
    """
    rng = np.random.default_rng(0)
    archive = os.path.join(root, "extracted")  # images.tar.gz holds images/, annotations.tar.gz annotations/
    written, lists = {}, {"trainval": [], "test": []}
    for stem, label, split, size in PET_EXAMPLES:
        jpeg = _jpeg(rng, size)
        os.makedirs(os.path.join(archive, "images"), exist_ok=True)
        with open(os.path.join(archive, "images", f"{stem}.jpg"), "wb") as file:
            file.write(jpeg)
        trimap = _every_value(rng, np.array([1, 2, 3], np.uint8), (trimap_sizes or {}).get(stem, size))
        _write_png(os.path.join(archive, "annotations", "trimaps", f"{stem}.png"), trimap)
        lists[split].append(f"{stem} {label + 1} 1 1")  # CLASS-ID SPECIES BREED-ID, 1-based
        written[stem] = {"jpeg": jpeg, "label": label, "trimap": trimap, "split": split}
    for split, lines in lists.items():
        with open(os.path.join(archive, "annotations", f"{split}.txt"), "w") as file:
            file.write("\n".join(lines) + "\n")
    data_dir = os.path.join(root, "tfds")
    builder = tfds.builder("oxford_iiit_pet", data_dir=data_dir, file_format="array_record")
    with _offline_download_manager(download_and_extract=lambda urls: {key: archive for key in urls}):
        builder.download_and_prepare(download_config=PREPARE)
    return data_dir, written


def _encode_png_with_pil(self, np_image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np_image[..., 0], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _cv2_imdecode_greyscale(buffer: np.ndarray, flags: int) -> np.ndarray:
    assert flags == 0, "the builder decodes segmentations in greyscale"
    return np.asarray(Image.open(io.BytesIO(buffer.tobytes())).convert("L"))


def prepare_cub(root) -> tuple[str, dict]:
    """Prepares caltech_birds2011 from CUB_EXAMPLES in `root`/tfds; returns (data_dir, {stem: what was written})."""
    rng = np.random.default_rng(1)
    extracted, segmentations = os.path.join(root, "CUB_200_2011.tgz"), os.path.join(root, "segmentations.tgz")
    images_tgz = os.path.join(root, "CUB_200_2011_images.tgz")
    written, image_lines, split_lines, bbox_lines = {}, [], [], []
    with tarfile.open(images_tgz, "w:gz") as tar:
        for index, (class_dir, stem, is_train, size) in enumerate(CUB_EXAMPLES, start=1):
            jpeg = _jpeg(rng, size)
            member = tarfile.TarInfo(f"CUB_200_2011/images/{class_dir}/{stem}.jpg")
            member.size = len(jpeg)
            tar.addfile(member, io.BytesIO(jpeg))
            segmentation = _every_value(rng, CUB_VALUES, size)
            _write_png(os.path.join(segmentations, "segmentations", class_dir, f"{stem}.png"), segmentation)
            image_lines.append(f"{index} {class_dir}/{stem}.jpg")
            split_lines.append(f"{index} {is_train}")
            bbox_lines.append(f"{index} 1.0 2.0 {size[1] - 3}.0 {size[0] - 4}.0")  # x y width height
            written[stem] = {"jpeg": jpeg, "label": int(class_dir[:3]) - 1, "segmentation": segmentation,
                             "split": "train" if is_train else "test"}
    os.makedirs(os.path.join(extracted, "CUB_200_2011"))
    for filename, lines in [("images.txt", image_lines), ("train_test_split.txt", split_lines),
                            ("bounding_boxes.txt", bbox_lines)]:
        with open(os.path.join(extracted, "CUB_200_2011", filename), "w") as file:
            file.write("\n".join(lines) + "\n")

    data_dir = os.path.join(root, "tfds")
    builder = tfds.builder("caltech_birds2011", data_dir=data_dir, file_format="array_record")
    gfile = types.SimpleNamespace(io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=open, walk=os.walk)))
    cv2 = types.SimpleNamespace(imdecode=_cv2_imdecode_greyscale)
    with _offline_download_manager(
        download=lambda urls: [images_tgz],
        download_and_extract=lambda urls: [extracted, segmentations],
        iter_archive=lambda path: tfds.download.iter_archive(open(path, "rb"), tfds.download.ExtractMethod.TAR_GZ),
    ), mock.patch.object(caltech_birds, "tf", gfile), mock.patch.dict(sys.modules, {"cv2": cv2}), \
            mock.patch.object(image_feature._ImageEncoder, "_encode_image", _encode_png_with_pil):
        builder.download_and_prepare(download_config=PREPARE)
    return data_dir, written


@pytest.fixture(scope="module")
def pet(tmp_path_factory):
    return prepare_pet(tmp_path_factory.mktemp("pet"))


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return prepare_cub(tmp_path_factory.mktemp("cub"))


def _check_split(split, written: dict, expected_split: str, num_classes: int, expected_mask) -> None:
    """Every example of `expected_split` is there once, with its bytes, size, one-hot label and mapped mask."""
    expected_names = sorted(stem for stem, example in written.items() if example["split"] == expected_split)
    assert sorted(split.names) == expected_names
    chex.assert_shape(split.labels, (len(expected_names), num_classes))
    assert split.labels.dtype == np.bool_
    for index, stem in enumerate(split.names):
        example = written[stem]
        assert split.images[index] == example["jpeg"]
        one_hot = np.zeros(num_classes, dtype=bool)
        one_hot[example["label"]] = True
        np.testing.assert_array_equal(split.labels[index], one_hot)
        mask = decode_mask(split.masks[index])
        np.testing.assert_array_equal(mask, expected_mask(example))
        np.testing.assert_array_equal(split.sizes[index], mask.shape)


def _pet_mask(example) -> np.ndarray:
    trimap, label = example["trimap"], example["label"]
    return np.select([trimap == 1, trimap == 2, trimap == 3], [label + 1, 0, VOID]).astype(np.uint8)


def _cub_mask(example) -> np.ndarray:
    return np.where(example["segmentation"] >= 128, example["label"] + 1, 0).astype(np.uint8)


@pytest.mark.parametrize("split, archive_split", [("train", "trainval"), ("test", "test")])
def test_pet_split_has_one_hot_labels_sizes_and_trimaps_as_class_masks(pet, split, archive_split):
    data_dir, written = pet
    _check_split(load_tfds_split("oxford_iiit_pet", split, data_dir), written, archive_split, 37, _pet_mask)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cub_split_has_one_hot_labels_sizes_and_thresholded_masks(cub, split):
    data_dir, written = cub
    _check_split(load_tfds_split("caltech_birds2011", split, data_dir), written, split, 200, _cub_mask)


def test_split_slices_are_read(pet):
    data_dir, _ = pet
    assert len(load_tfds_split("oxford_iiit_pet", "train[:2]", data_dir)) == 2
    assert len(load_tfds_split("oxford_iiit_pet", "train+test", data_dir)) == len(PET_EXAMPLES)


def test_mask_conversions_map_each_value():
    np.testing.assert_array_equal(pet_trimap_to_mask(np.array([[1, 2, 3]], np.uint8), 36), [[37, 0, VOID]])
    np.testing.assert_array_equal(cub_segmentation_to_mask(CUB_VALUES[None], 199),
                                  [[0, 0, 0, 0, 200, 200, 200, 200]])
    with pytest.raises(ValueError, match="pug_7 has trimap value 0"):
        pet_trimap_to_mask(np.array([[0, 1]], np.uint8), 0, "pug_7")


def test_unknown_dataset_or_split_is_named(pet):
    data_dir, _ = pet
    with pytest.raises(ValueError, match="unknown dataset 'voc2012'.*oxford_iiit_pet, caltech_birds2011"):
        load_tfds_split("voc2012", "train", data_dir)
    with pytest.raises(ValueError, match="unknown split 'validation' for oxford_iiit_pet; it has train, test"):
        load_tfds_split("oxford_iiit_pet", "validation", data_dir)


@pytest.mark.parametrize("folder, reason", [
    (None, "there is no {data_dir}/caltech_birds2011/0.2.0"),
    ("3.2.0", "it has only version(s) 3.2.0 and this tensorflow-datasets reads 0.2.0"),
    # A partial copy: `tfds build` would take the folder for a finished build and build nothing.
    ("0.2.0", "{data_dir}/caltech_birds2011/0.2.0 has no dataset_info.json, so it is no finished build (a partial "
              "copy? files deleted from it?); delete it first"),
    ("incomplete.K1LLED_0.2.0",
     "there is no {data_dir}/caltech_birds2011/0.2.0; delete {data_dir}/caltech_birds2011/incomplete.K1LLED_0.2.0, "
     "left by a build that was killed"),
])
def test_unprepared_dataset_says_why_and_how_to_prepare_it(tmp_path, folder, reason):
    if folder:
        (tmp_path / "caltech_birds2011" / folder).mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        load_tfds_split("caltech_birds2011", "train", tmp_path)
    message = str(error.value)
    assert reason.format(data_dir=tmp_path) in message
    assert f"tfds build caltech_birds2011 --data_dir {tmp_path} --file_format=array_record" in message
    assert "pip install tensorflow opencv-python" in message


def test_tfrecord_only_dataset_says_how_to_convert_it(pet, tmp_path):
    data_dir, _ = pet
    shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)
    info_path = tmp_path / "oxford_iiit_pet" / "4.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="stored as tfrecord only.*tfds convert_format --dataset_version_dir "
                                         ".*--out_file_format array_record"):
        load_tfds_split("oxford_iiit_pet", "test", tmp_path)


def test_mask_of_another_size_than_its_image_is_named(tmp_path):
    data_dir, _ = prepare_pet(tmp_path, trimap_sizes={"Bengal_2": (16, 27)})
    with pytest.raises(ValueError, match="the mask of Bengal_2 is 27x16 but its image is 28x16"):
        load_tfds_split("oxford_iiit_pet", "test", data_dir)
    assert len(load_tfds_split("oxford_iiit_pet", "train", data_dir)) == 3


@pytest.mark.parametrize("spoil", [damage.truncate_to_half, damage.scramble_records])
def test_damaged_shard_is_named_with_what_to_delete_and_run(pet, tmp_path, spoil):
    data_dir = tmp_path / "tfds"
    shutil.copytree(pet[0], data_dir)
    folder = data_dir / "oxford_iiit_pet" / "4.0.0"
    (shard,) = folder.glob("oxford_iiit_pet-test.array_record*")
    spoil(shard)
    with pytest.raises(ValueError) as error:
        load_tfds_split("oxford_iiit_pet", "test", data_dir)
    message = str(error.value)
    assert str(shard) in message
    assert (f"delete {folder} and prepare it again: `tfds build oxford_iiit_pet --data_dir {data_dir} "
            "--file_format=array_record`") in message
    assert len(load_tfds_split("oxford_iiit_pet", "train", data_dir)) == 3  # the intact split still reads
    shutil.rmtree(folder)
    _, written = prepare_pet(tmp_path)  # as `tfds build` would, into the same data_dir
    _check_split(load_tfds_split("oxford_iiit_pet", "test", data_dir), written, "test", 37, _pet_mask)
