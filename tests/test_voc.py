"""The VOC 2012 builder on a tiny tree in the official layout, as a tarball and extracted, and its bad inputs."""

import dataclasses
import io
import pathlib
import pickle
import re
import tarfile

import chex
import numpy as np
import pytest
from PIL import Image

from attrjax.data import VOC_NORMALIZATION, _prepared as prepared, voc
from attrjax.data._images import VOID, decode_mask, decode_rgb, random_resized_crop_batches, resize_split
from attrjax.data.voc import CLASS_NAMES, SPLITS, TARBALL, VocLayoutError, build_voc, load_voc, palette_colours
from attrjax.data.voc import _builder as voc_builder
from attrjax.data.voc import main as voc_main
from tests import damage, voc_fixture
from tests.voc_fixture import IMAGES, MAIN, SEGMENTATION, expected_labels, expected_mask


@pytest.fixture(scope="module")
def built_from_tarball(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("voc")
    voc_fixture.write_voc_tarball(root / "source", root / "data" / "downloads" / "manual")
    build_voc(root / "data")
    return root


def test_palette_is_the_voc_colour_map():
    colours = palette_colours()
    chex.assert_trees_all_equal(colours[0], np.array([0, 0, 0], np.uint8))
    chex.assert_trees_all_equal(colours[1], np.array([128, 0, 0], np.uint8))  # aeroplane
    chex.assert_trees_all_equal(colours[15], np.array([192, 128, 128], np.uint8))  # person
    chex.assert_trees_all_equal(colours[20], np.array([0, 64, 128], np.uint8))  # tvmonitor
    assert len({tuple(c) for c in colours}) == 21


@pytest.mark.parametrize("include_difficult", [True, False])
def test_main_splits_keep_order_bytes_and_labels(built_from_tarball, include_difficult):
    source = built_from_tarball / "source" / "VOCdevkit" / "VOC2012"
    for split, ids in MAIN.items():
        images = load_voc(built_from_tarball / "data", split, include_difficult=include_difficult)
        assert images.names == [f"{i}.jpg" for i in ids]
        assert images.masks is None
        expected = np.stack([expected_labels(i, include_difficult) for i in ids])
        chex.assert_trees_all_equal(images.labels, expected)
        chex.assert_trees_all_equal(images.sizes, np.array([IMAGES[i][:2] for i in ids]))
        for image_id, encoded in zip(ids, images.images):
            assert encoded == (source / "JPEGImages" / f"{image_id}.jpg").read_bytes()


def test_difficult_switch_changes_only_difficult_classes(built_from_tarball):
    with_difficult = load_voc(built_from_tarball / "data", "train").labels
    without = load_voc(built_from_tarball / "data", "train", include_difficult=False).labels
    # 2008_000002 has a difficult and a plain cat; 2008_000003's only bus is difficult.
    assert with_difficult[1, CLASS_NAMES.index("cat")] and without[1, CLASS_NAMES.index("cat")]
    assert with_difficult[2, CLASS_NAMES.index("bus")] and not without[2].any()


def test_segmentation_masks_come_out_as_written(built_from_tarball):
    for split, ids in SEGMENTATION.items():
        images = load_voc(built_from_tarball / "data", split, config="segmentation")
        assert images.names == [f"{i}.jpg" for i in ids]
        for image_id, encoded in zip(ids, images.masks):
            chex.assert_trees_all_equal(decode_mask(encoded), expected_mask(image_id))


def test_extracted_directory_and_rgb_masks_build_the_same(built_from_tarball, tmp_path):
    voc = voc_fixture.write_voc_tree(tmp_path / "manual")
    # An RGB copy of a mask (as some tools save them) maps back through the palette, void colour included.
    rgb_path = voc / "SegmentationClass" / "2008_000004.png"
    Image.open(rgb_path).convert("RGB").save(rgb_path)
    build_voc(tmp_path / "data", manual_dir=tmp_path / "manual", configs=("segmentation",))
    extracted = load_voc(tmp_path / "data", "val", config="segmentation")
    from_tar = load_voc(built_from_tarball / "data", "val", config="segmentation")
    chex.assert_trees_all_equal(extracted.labels, from_tar.labels)
    for ours, theirs in zip(extracted.masks, from_tar.masks):
        chex.assert_trees_all_equal(decode_mask(ours), decode_mask(theirs))


def test_tarball_with_dot_slash_member_names(built_from_tarball, tmp_path):
    voc_fixture.write_voc_tarball(tmp_path / "source", tmp_path / "manual", top="./VOCdevkit")
    build_voc(tmp_path / "data", manual_dir=tmp_path / "manual", configs=("main",))
    chex.assert_trees_all_equal(load_voc(tmp_path / "data", "train").labels,
                                load_voc(built_from_tarball / "data", "train").labels)


def test_localisation_arrays_resize_masks_nearest_and_keep_void_out_of_labels(built_from_tarball):
    images = load_voc(built_from_tarball / "data", "val", config="segmentation")
    arrays = resize_split(images, 227, labels_from_masks=True)
    chex.assert_shape(arrays["image"], (2, 227, 227, 3))
    chex.assert_shape(arrays["mask"], (2, 227, 227))
    for n, image_id in enumerate(SEGMENTATION["val"]):
        mask = expected_mask(image_id)
        rows = np.floor((np.arange(227) + 0.5) * mask.shape[0] / 227).astype(int)
        cols = np.floor((np.arange(227) + 0.5) * mask.shape[1] / 227).astype(int)
        chex.assert_trees_all_equal(arrays["mask"][n], mask[rows][:, cols])  # PIL NEAREST samples pixel centres
        assert VOID in arrays["mask"][n]
        expected = np.zeros(20, bool)
        expected[[value - 1 for value in np.unique(mask) if 0 < value < VOID]] = True
        chex.assert_trees_all_equal(arrays["labels"][n], expected)
    reference = decode_rgb(images.images[0]).resize((227, 227), Image.Resampling.BILINEAR)
    chex.assert_trees_all_equal(arrays["image"][0], np.asarray(reference))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the file and what to do.


def _build_error(manual_dir, tmp_path, error=(VocLayoutError, ValueError)):
    with pytest.raises(error) as info:
        build_voc(tmp_path / "data", manual_dir=manual_dir, configs=("segmentation",))
    return str(info.value)


def test_missing_archive(tmp_path):
    message = _build_error(tmp_path / "nowhere", tmp_path)
    assert "does not exist" in message and TARBALL in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    message = _build_error(tmp_path / "empty", tmp_path)
    assert "notes.txt" in message and TARBALL in message


def test_wrong_archive(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "other.txt").write_text("not VOC")
    with tarfile.open(tmp_path / "manual" / TARBALL, "w") as archive:
        archive.add(tmp_path / "other.txt", arcname="other/other.txt")
    assert "ImageSets/Main/train.txt" in _build_error(tmp_path / "manual", tmp_path)


def test_listed_image_missing(tmp_path):
    voc = voc_fixture.write_voc_tree(tmp_path / "manual")
    (voc / "JPEGImages" / "2008_000005.jpg").unlink()
    message = _build_error(tmp_path / "manual", tmp_path)
    assert "JPEGImages/2008_000005.jpg is missing" in message


def test_truncated_image(tmp_path):
    voc = voc_fixture.write_voc_tree(tmp_path / "manual")
    path = voc / "JPEGImages" / "2008_000004.jpg"
    path.write_bytes(path.read_bytes()[:200])
    message = _build_error(tmp_path / "manual", tmp_path)
    assert "2008_000004.jpg cannot be decoded" in message and "truncated" in message


def test_mask_of_another_size(tmp_path):
    voc = voc_fixture.write_voc_tree(tmp_path / "manual")
    voc_fixture.palette_png(np.zeros((10, 10), np.uint8), voc / "SegmentationClass" / "2008_000005.png")
    message = _build_error(tmp_path / "manual", tmp_path)
    assert "2008_000005.png is 10x10" in message and "32x32" in message


def test_mask_with_unknown_colour(tmp_path):
    voc = voc_fixture.write_voc_tree(tmp_path / "manual")
    Image.new("RGB", (34, 28), (1, 2, 3)).save(voc / "SegmentationClass" / "2008_000004.png")
    assert "(1, 2, 3), which is not in the VOC palette" in _build_error(tmp_path / "manual", tmp_path)


def test_loading_before_building(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m attrjax.data.voc"):
        load_voc(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown VOC split"):
        load_voc(tmp_path, "test")


def test_damaged_jpeg_in_a_loaded_split_is_named(built_from_tarball):
    images = load_voc(built_from_tarball / "data", "train")
    assert decode_rgb(images.images[0], images.names[0]).size == (40, 30)
    with pytest.raises(ValueError, match="2008_000001.jpg cannot be decoded"):
        decode_rgb(images.images[0][:100], images.names[0])


def test_images_are_read_per_record_from_disk_in_any_thread_and_worker(built_from_tarball):
    images = load_voc(built_from_tarball / "data", "train", config="segmentation")
    source = built_from_tarball / "source" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    assert isinstance(images.images, prepared.RecordFeature) and "voc2012/segmentation" in repr(images.images)
    expected = [(source / f"{i}.jpg").read_bytes() for i in SEGMENTATION["train"]]
    assert images.images[:] == expected and images.images[-1] == expected[-1] and list(images.images) == expected
    with pytest.raises(IndexError, match="record 1 of 1"):
        images.images[1]
    with pytest.raises(KeyError, match="no feature 'depth'.*image"):
        prepared.RecordFeature(voc_builder(built_from_tarball / "data", "main"), "train", "depth")
    everything = load_voc(built_from_tarball / "data", "train")
    in_memory = dataclasses.replace(everything, images=everything.images[:])
    assert pickle.loads(pickle.dumps(everything)).images[:] == in_memory.images  # as grain sends it to workers

    def stream(split, **loader):
        return random_resized_crop_batches(split, 2, image_size=16, seed=3, normalization=VOC_NORMALIZATION,
                                           num_steps=6, **loader)

    expected_batches = list(stream(in_memory, threads=1))
    for loader in ({"threads": 4}, {"workers": 1, "threads": 2}):
        chex.assert_trees_all_equal(list(stream(everything, **loader)), expected_batches)


def test_a_scan_holds_at_most_a_chunk_of_records(built_from_tarball, monkeypatch):
    builder = voc_builder(built_from_tarball / "data", "main")
    names = prepared.read_records(builder, "train+val", "", keep=lambda record: record["image/filename"].decode())
    monkeypatch.setattr(prepared, "_SCAN_CHUNK", 2)
    seen = []
    chunked = prepared.read_records(builder, "train+val", "", keep=lambda record: seen.append(record) or
                                    record["image/filename"].decode())
    assert chunked == names == [f"{i}.jpg" for i in MAIN["train"] + MAIN["val"]] and len(seen) == 5


def test_command_line_builds_from_an_extracted_tree(tmp_path, capsys):
    voc_fixture.write_voc_tree(tmp_path / "manual")
    voc_main(["--data_dir", str(tmp_path / "data"), "--manual_dir", str(tmp_path / "manual")])
    assert load_voc(tmp_path / "data", "val").names == [f"{i}.jpg" for i in MAIN["val"]]
    voc_main(["--data_dir", str(tmp_path / "data"), "--manual_dir", str(tmp_path / "manual")])
    assert "voc2012/segmentation: reusing" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Half-built or damaged builds and archives: named, and built again from the archive.


def _assert_same_images(actual, expected):
    assert actual.names == expected.names
    assert actual.images[:] == expected.images[:]
    chex.assert_trees_all_equal(actual.labels, expected.labels)
    chex.assert_trees_all_equal(actual.sizes, expected.sizes)


def _built_main(root: pathlib.Path) -> pathlib.Path:
    """Builds the main config into `root`/data from a tarball in its default manual directory; returns the build."""
    voc_fixture.write_voc_tarball(root / "source", root / "data" / "downloads" / "manual")
    build_voc(root / "data", configs=("main",))
    (folder,) = (root / "data" / "voc2012" / "main").glob("1.0.0")
    return folder


def test_folder_without_dataset_info_is_named_and_built_again(built_from_tarball, tmp_path, capsys):
    folder = _built_main(tmp_path)
    (folder / "dataset_info.json").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_voc(tmp_path / "data", "train")
    assert f"{folder} has no dataset_info.json" in str(error.value)
    capsys.readouterr()
    damage.follow_the_advice(str(error.value), "attrjax.data.voc", voc_main)
    assert f"deleting {folder} to build it again" in capsys.readouterr().out
    for split in SPLITS:
        _assert_same_images(load_voc(tmp_path / "data", split), load_voc(built_from_tarball / "data", split))


@pytest.mark.parametrize("spoil", [damage.truncate_to_half, damage.scramble_records])
def test_damaged_shard_is_named_and_built_again(built_from_tarball, tmp_path, spoil):
    folder = _built_main(tmp_path)
    (shard,) = folder.glob("voc2012-train.array_record*")
    spoil(shard)
    with pytest.raises(ValueError, match=re.escape(str(shard))) as error:
        load_voc(tmp_path / "data", "train")
    assert f"delete {folder} and build it again" in str(error.value)
    damage.follow_the_advice(str(error.value), "attrjax.data.voc", voc_main)
    _assert_same_images(load_voc(tmp_path / "data", "train"), load_voc(built_from_tarball / "data", "train"))


def _tarball_cuts(tarball: pathlib.Path) -> dict[str, int]:
    with tarfile.open(tarball) as archive:
        member = archive.getmember("VOCdevkit/VOC2012/JPEGImages/2008_000003.jpg")
    return {"inside a file": member.offset_data + 10, "between files": member.offset,
            "inside a header": member.offset + 100}


@pytest.mark.parametrize("cut", ["inside a file", "between files", "inside a header"])
def test_truncated_tarball_is_named_and_the_complete_one_builds(built_from_tarball, tmp_path, cut):
    manual = tmp_path / "data" / "downloads" / "manual"
    tarball = voc_fixture.write_voc_tarball(tmp_path / "source", manual)
    complete = tarball.read_bytes()
    tarball.write_bytes(complete[:_tarball_cuts(tarball)[cut]])
    with pytest.raises(ValueError, match=rf"{re.escape(str(tarball))} .*truncated or damaged.*replace it"):
        build_voc(tmp_path / "data", configs=("main",))
    assert not list((tmp_path / "data" / "voc2012" / "main").iterdir())  # TFDS removed its temporary folder
    tarball.write_bytes(complete)
    build_voc(tmp_path / "data", configs=("main",))
    _assert_same_images(load_voc(tmp_path / "data", "val"), load_voc(built_from_tarball / "data", "val"))


def _sparse_member(name: str, claimed: int) -> bytes:
    """An old-GNU sparse member `name`: one 512-byte block of data at the end of a file that claims `claimed` bytes,
    the rest holes (tarfile writes no sparse members, so its header is patched by hand)."""
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT))
    header[124:136] = tarfile.itn(tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)  # the stored size
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = tarfile.itn(claimed - tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)  # the data's offset...
    header[398:410] = tarfile.itn(tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)  # ...and length
    header[483:495] = tarfile.itn(claimed, 12, tarfile.GNU_FORMAT)  # the real (claimed) size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"\xff" * tarfile.BLOCKSIZE


def test_sparse_and_oversized_members_are_refused_before_reading(tmp_path, monkeypatch):
    manual = tmp_path / "data" / "downloads" / "manual"
    tarball = voc_fixture.write_voc_tarball(tmp_path / "source", manual)
    complete = tarball.read_bytes()
    sparse = _sparse_member("VOCdevkit/VOC2012/ImageSets/Main/notes.txt", 8 * 2**30)
    with tarfile.open(fileobj=io.BytesIO(sparse)) as archive:
        (member,) = archive.getmembers()
        assert member.issparse() and member.size == 8 * 2**30  # what a reader would fill with zeros
    tarball.write_bytes(sparse + complete)
    with pytest.raises(ValueError, match=r"ImageSets/Main/notes.txt in .* is a sparse file \(it claims "
                                         r"8,589,934,592 bytes.*without --sparse"):
        build_voc(tmp_path / "data", configs=("main",))
    tarball.write_bytes(complete)
    monkeypatch.setattr(voc, "MAX_MEMBER_BYTES", 100)  # every fixture image and annotation is bigger
    with pytest.raises(ValueError, match=r"2008_000001\.xml in .* is 542 bytes, over the 100 a VOC "
                                         r"2012 file may be.*raise attrjax.data.voc.MAX_MEMBER_BYTES"):
        build_voc(tmp_path / "data", configs=("main",))
    voc_fixture.write_voc_tree(tmp_path / "extracted")
    with pytest.raises(ValueError, match=r"JPEGImages/2008_000001.jpg is [\d,]+ bytes, over the 100"):
        build_voc(tmp_path / "data", manual_dir=tmp_path / "extracted", configs=("main",))
    monkeypatch.undo()
    build_voc(tmp_path / "data", configs=("main",))
    assert load_voc(tmp_path / "data", "val").names == [f"{i}.jpg" for i in MAIN["val"]]


def test_temporary_folder_of_a_killed_build_is_deleted(tmp_path, capsys):
    # What TFDS leaves when the process is killed while it writes the build (see tests/test_data.py).
    folder = _built_main(tmp_path)
    leftover = folder.parent / f"incomplete.K1LLED_{folder.name}"
    leftover.mkdir()
    (leftover / "voc2012-train.array_record-00000-of-00001").write_bytes(b"half a shard")
    build_voc(tmp_path / "data", configs=("main",))
    assert f"deleting {leftover}" in capsys.readouterr().out
    assert not leftover.exists() and folder.is_dir()
