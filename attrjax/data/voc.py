"""PASCAL VOC 2012 as a TFDS builder, read from the user's own copy (nothing is downloaded).

Place `VOCtrainval_11-May-2012.tar` (or the extracted `VOCdevkit/`) in the manual directory, by default
`<data_dir>/downloads/manual/`, then

    build_voc("/data")                                  # both configs, once (minutes: every image is checked)
    train = load_voc("/data", "train")                  # LabeledImages of ImageSets/Main/train.txt
    seg = load_voc("/data", "val", config="segmentation")   # the 1,449 images with class masks

or from a shell: `python -m attrjax.data.voc --data_dir /data [--manual_dir DIR]`.

Two configs, each with the `train` and `val` lists of its ImageSets folder:
- `main`: ImageSets/Main (5,717 / 5,823 images), the paper's classification splits;
- `segmentation`: ImageSets/Segmentation (1,464 / 1,449 images) with per-pixel class masks; the paper evaluates
  localisation on its val split.

Every example keeps the annotation's objects (class, difficult, truncated); `load_voc` turns them into multi-hot
labels, difficult objects included as in the paper (`include_difficult=False` leaves them out). Masks are stored as
single-channel PNGs of class indices: 0 background, c + 1 for class c, 255 (`VOID`) for the outlines and pixels the
annotators left unlabelled. The reference code maps void to background; here void belongs to no class and is not
background either, so it counts for no class in the pointing game or the mask AUC.

A damaged or crafted archive cannot make the builder read more than a VOC file can be: every file the archive holds
must be at most `MAX_MEMBER_BYTES` (64 MiB; VOC's images, annotations and masks are under a megabyte) and no member
may be sparse (holes a reader fills with zeros, so a few kilobytes can claim gigabytes). Both are checked when the
archive is opened, before anything is read; an extracted file's size is checked before it is read. For a genuine
file over the limit, raise it: `attrjax.data.voc.MAX_MEMBER_BYTES = ...`.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import pathlib
import tarfile
import xml.etree.ElementTree as ElementTree
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from attrjax.data import _prepared as prepared
from attrjax.data._images import VOID, LabeledImages, decode_rgb, encode_png
from attrjax._progress import track

CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
TARBALL = "VOCtrainval_11-May-2012.tar"
CONFIGS = {"main": "Main", "segmentation": "Segmentation"}
SPLITS = ("train", "val")
# SegmentationClass PNGs are palette images whose index is the class; an RGB copy is mapped back by colour.
_VOID_COLOUR = (224, 224, 192)
MAX_MEMBER_BYTES = 64 * 2**20
"""The largest file the builder reads (see the module docstring); raise it for a genuine file over it."""


def palette_colours() -> np.ndarray:
    """(21, 3) uint8 RGB colour of background and the 20 classes in the VOC palette (bit-interleaved index)."""
    colours = np.zeros((21, 3), dtype=np.uint8)
    for index in range(21):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (red, green, blue)
    return colours


_MANUAL_INSTRUCTIONS = f"""Place {TARBALL} (the PASCAL VOC 2012 trainval archive) or its extracted VOCdevkit/ folder
in the manual directory (default <data_dir>/downloads/manual/, or pass --manual_dir)."""


class VocLayoutError(FileNotFoundError):
    """The manual directory does not hold VOC 2012 in the layout of the official archive."""


def _end_of_members(members: list[tarfile.TarInfo]) -> int:
    """The byte offset just after the data of the last of `members`, where the end-of-archive marker belongs."""
    if not members:
        return 0
    last = members[-1]
    return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _refuse_oversized(where: str, size: int) -> None:
    """Refuses a file of `size` bytes over `MAX_MEMBER_BYTES`, before it is read."""
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"{where} is {size:,} bytes, over the {MAX_MEMBER_BYTES:,} a VOC 2012 file may be (its "
                         "images, annotations and masks are under a megabyte): the archive is damaged or not the "
                         f"official {TARBALL}; replace it. If the file is genuine, raise "
                         "attrjax.data.voc.MAX_MEMBER_BYTES")


def _refuse_unsafe_members(tarball: pathlib.Path, members: list[tarfile.TarInfo]) -> None:
    """Refuses an archive with a sparse file or a file over `MAX_MEMBER_BYTES`, from the headers alone."""
    for member in members:
        if member.issparse():
            raise ValueError(f"{member.name} in {tarball} is a sparse file (it claims {member.size:,} bytes, most of "
                             f"them holes read as zeros); the official {TARBALL} has none: replace the archive, or "
                             "write it again without --sparse")
        if member.isfile():
            _refuse_oversized(f"{member.name} in {tarball}", member.size)


def _open_tarball(tarball: pathlib.Path) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
    """The open archive and its members; ValueError naming `tarball` when it is truncated or damaged, or holds a
    sparse member or one over `MAX_MEMBER_BYTES`.

    tarfile stops without an error at a truncated or unreadable header, as if the archive ended there; a real end
    is marked by a zero block, which is checked for.
    """
    advice = (f"it is truncated or damaged (an interrupted download or copy?): replace it with a complete {TARBALL}"
              " and build again")
    try:
        tar = tarfile.open(tarball)
        members = tar.getmembers()
    except tarfile.TarError as error:
        raise ValueError(f"{tarball} cannot be read as a tar archive ({error}); {advice}") from error
    _refuse_unsafe_members(tarball, members)
    end = _end_of_members(members)
    with open(tarball, "rb") as file:
        file.seek(end)
        marker = file.read(tarfile.BLOCKSIZE)
    if marker != bytes(tarfile.BLOCKSIZE):
        raise ValueError(f"{tarball} stops after {len(members)} entries, at byte {end} of {tarball.stat().st_size}, "
                         f"without the zero block that ends a tar archive; {advice}")
    return tar, members


class _VocFiles:
    """Read access to VOCdevkit/VOC2012 inside a tar archive or an extracted directory, by relative path."""

    def __init__(self, manual_dir: pathlib.Path):
        self.tarball: pathlib.Path | None = None
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        root: pathlib.PurePath | None = self.find_extracted(manual_dir)
        if root is None:
            self.tarball = self.find_tarball(manual_dir)
            self.tar, members = _open_tarball(self.tarball)
            # Normalised names: archives written as `tar -cf x.tar ./VOCdevkit` prefix every member with "./".
            self.members = {pathlib.PurePosixPath(member.name).as_posix(): member
                            for member in members if member.isfile()}
            root = self._root_in_tar(self.tarball)
        self.root = root  # the extracted directory, or the folder inside the archive

    @staticmethod
    def find_extracted(manual_dir: pathlib.Path) -> pathlib.Path | None:
        for candidate in (manual_dir / "VOCdevkit" / "VOC2012", manual_dir / "VOC2012", manual_dir):
            if (candidate / "ImageSets").is_dir():
                return candidate
        return None

    @staticmethod
    def find_tarball(manual_dir: pathlib.Path) -> pathlib.Path:
        if not manual_dir.is_dir():
            raise VocLayoutError(f"the manual directory {manual_dir} does not exist. {_MANUAL_INSTRUCTIONS}")
        tarballs = sorted(manual_dir.glob("*.tar"))
        preferred = [path for path in tarballs if path.name == TARBALL]
        if not (preferred or tarballs):
            raise VocLayoutError(f"found neither {TARBALL} nor VOCdevkit/VOC2012/ImageSets in {manual_dir} (it has: "
                                 f"{', '.join(sorted(p.name for p in manual_dir.iterdir())) or 'nothing'}). "
                                 f"{_MANUAL_INSTRUCTIONS} Extract a compressed archive first: reading single "
                                 "files from it would decompress it over and over")
        return (preferred or tarballs)[0]

    def _root_in_tar(self, tarball: pathlib.Path) -> pathlib.PurePosixPath:
        marker = "ImageSets/Main/train.txt"
        for name in self.members:
            if name.endswith(marker):
                return pathlib.PurePosixPath(name[:-len(marker)])
        raise VocLayoutError(f"{tarball} has no {marker}: it is not the VOC 2012 trainval archive "
                             f"({len(self.members)} files). {_MANUAL_INSTRUCTIONS}")

    def where(self, relative: str) -> str:
        return f"{self.root / relative}" + (f" in {self.tarball}" if self.tarball else "")

    def exists(self, relative: str) -> bool:
        if self.tar is None:
            return pathlib.Path(self.root, relative).is_file()
        return str(self.root / relative) in self.members

    def read(self, relative: str) -> bytes:
        if not self.exists(relative):
            raise VocLayoutError(f"{self.where(relative)} is missing; the VOC 2012 layout needs it. Re-extract the "
                                 f"archive or put the complete {TARBALL} in the manual directory")
        if self.tar is None:
            path = pathlib.Path(self.root, relative)
            _refuse_oversized(self.where(relative), path.stat().st_size)
            return path.read_bytes()
        file = self.tar.extractfile(self.members[str(self.root / relative)])
        assert file is not None  # None only for members that are not regular files, which self.members leaves out
        return file.read()

    def image_ids(self, image_set: str, split: str) -> list[str]:
        listing = f"ImageSets/{image_set}/{split}.txt"
        ids = [line.split()[0] for line in self.read(listing).decode().splitlines() if line.strip()]
        if not ids:
            raise VocLayoutError(f"{self.where(listing)} lists no images")
        return ids


def parse_objects(xml: bytes, where: str) -> dict[str, np.ndarray]:
    """An annotation XML -> `label` (M,) int64 class indices, `difficult` and `truncated` (M,) bool."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise ValueError(f"{where} is not valid XML ({error}); replace it from the original archive") from error
    labels, difficult, truncated = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASS_NAMES:
            raise ValueError(f"{where} has an object of unknown class {name!r}; VOC 2012 classes are "
                             f"{', '.join(CLASS_NAMES)}")
        labels.append(CLASS_NAMES.index(name))
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
        truncated.append((obj.findtext("truncated") or "0").strip() == "1")
    return {"label": np.asarray(labels, np.int64), "difficult": np.asarray(difficult, bool),
            "truncated": np.asarray(truncated, bool)}


def _colour_code(colour) -> int:
    red, green, blue = (int(channel) for channel in colour)
    return (red << 16) | (green << 8) | blue


def mask_indices(mask: Image.Image, where: str) -> np.ndarray:
    """A SegmentationClass PNG -> (H, W) uint8: 0 background, c + 1 class c, 255 void.

    Palette ('P') and greyscale PNGs carry the indices themselves; RGB PNGs are mapped through the VOC palette
    (the void colour (224, 224, 192) to 255). Any other value or colour is an error naming the file.
    """
    if mask.mode in ("P", "L"):
        indices = np.asarray(mask, dtype=np.uint8)
    elif mask.mode in ("RGB", "RGBA"):
        rgb = np.asarray(mask.convert("RGB"), dtype=np.int64)
        codes, pixel_codes = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], return_inverse=True)
        index_of_code = {_colour_code(colour): index for index, colour in enumerate(palette_colours())}
        index_of_code[_colour_code(_VOID_COLOUR)] = VOID
        unknown = [int(code) for code in codes if int(code) not in index_of_code]
        if unknown:
            colour = (unknown[0] >> 16, (unknown[0] >> 8) & 255, unknown[0] & 255)
            raise ValueError(f"{where} has colour {colour}, which is not in the VOC palette")
        indices = np.array([index_of_code[int(code)] for code in codes], np.uint8)[pixel_codes.reshape(rgb.shape[:2])]
    else:
        raise ValueError(f"{where} is a {mask.mode!r} image; VOC masks are palette (or RGB) PNGs")
    values = np.unique(indices)
    unknown = values[(values > len(CLASS_NAMES)) & (values != VOID)]
    if unknown.size:
        raise ValueError(f"{where} has class index {int(unknown[0])}; VOC masks use 0-20 and 255 (void)")
    return indices


class Voc2012(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 trainval: multi-label classification (ImageSets/Main) and class masks (Segmentation)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    # `main`: the classification lists; `segmentation`: the lists with class masks.
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"ImageSets/{folder}")
                       for name, folder in CONFIGS.items()]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # As attrjax_shapes: no URL checksums to locate, and the lookup fails on namespace packages.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "objects": tfds.features.Sequence({
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "difficult": np.bool_,
                "truncated": np.bool_,
            }),
        }
        if self.builder_config.name == "segmentation":
            features["segmentation_mask"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True)  # record i is line i of the ImageSets list

    def _split_generators(self, dl_manager):
        files = _VocFiles(pathlib.Path(dl_manager.manual_dir))
        image_set = CONFIGS[self.builder_config.name]
        return {split: self._generate_examples(files, files.image_ids(image_set, split), split) for split in SPLITS}

    def _generate_examples(self, files: _VocFiles, image_ids: list[str], split: str) -> Iterator[tuple[int, dict]]:
        with_masks = self.builder_config.name == "segmentation"
        description = f"voc2012/{self.builder_config.name}: converting {split}"
        for index, image_id in enumerate(track(image_ids, len(image_ids), description=description, unit="image")):
            jpeg_path = f"JPEGImages/{image_id}.jpg"
            jpeg = files.read(jpeg_path)
            size = decode_rgb(jpeg, files.where(jpeg_path)).size  # a full decode: truncated files fail here
            example = {"image": jpeg, "image/filename": f"{image_id}.jpg",
                       "objects": parse_objects(files.read(f"Annotations/{image_id}.xml"),
                                                files.where(f"Annotations/{image_id}.xml"))}
            if with_masks:
                example["segmentation_mask"] = encode_png(self._mask(files, image_id, size))
            yield index, example

    @staticmethod
    def _mask(files: _VocFiles, image_id: str, image_size: tuple[int, int]) -> np.ndarray:
        path = f"SegmentationClass/{image_id}.png"
        try:
            mask = Image.open(io.BytesIO(files.read(path)))
            mask.load()
        except OSError as error:
            raise ValueError(f"{files.where(path)} cannot be decoded ({error}); replace it from the archive") from error
        if mask.size != image_size:
            raise ValueError(f"{files.where(path)} is {mask.size[0]}x{mask.size[1]} but its image JPEGImages/"
                             f"{image_id}.jpg is {image_size[0]}x{image_size[1]} (width x height); masks must "
                             "cover their image pixel for pixel: replace the pair from the original archive")
        return mask_indices(mask, files.where(path))


def _builder(data_dir: str | os.PathLike, config: str) -> Voc2012:
    if config not in CONFIGS:
        raise ValueError(f"unknown VOC config {config!r}; choose one of {', '.join(CONFIGS)}")
    return Voc2012(config=config, data_dir=os.fspath(data_dir), file_format="array_record")


def _build_command(data_dir: str | os.PathLike) -> str:
    return f"python -m attrjax.data.voc --data_dir {os.fspath(data_dir)}"


def _prepare(builder: Voc2012, manual_dir: pathlib.Path) -> None:
    """Writes `builder`'s config from the VOC files in `manual_dir`, decoding every image and mask once."""
    if _VocFiles.find_extracted(manual_dir) is None:
        _VocFiles.find_tarball(manual_dir)  # raises, naming what is missing, before TFDS's generic assertion
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))


def build_voc(data_dir: str | os.PathLike, *, manual_dir: str | os.PathLike | None = None,
              configs: tuple[str, ...] = tuple(CONFIGS)) -> None:
    """Builds the VOC configs under `data_dir` from the archive in `manual_dir` unless a whole build is there.

    A half-built or damaged build (no dataset_info.json, a shard missing or short of records) is deleted and built
    again from the archive, as are the temporary folders of killed builds.
    """
    manual_dir = pathlib.Path(data_dir, "downloads", "manual") if manual_dir is None else pathlib.Path(manual_dir)
    for config in configs:
        prepared.build_or_reuse(functools.partial(_builder, data_dir, config), f"voc2012/{config}",
                                functools.partial(_prepare, manual_dir=manual_dir))


def multi_hot(objects_label, objects_difficult, include_difficult: bool) -> np.ndarray:
    """(M,) object classes and difficult flags -> (20,) bool, True for each class with a counted object."""
    objects_label = np.asarray(objects_label, dtype=np.int64)
    counted = objects_label if include_difficult else objects_label[~np.asarray(objects_difficult, dtype=bool)]
    labels = np.zeros(len(CLASS_NAMES), dtype=bool)
    labels[counted] = True
    return labels


def load_voc(data_dir: str | os.PathLike, split: str, *, config: str = "main",
             include_difficult: bool = True) -> LabeledImages:
    """Reads a built VOC split: labels, names and image sizes now, images (and masks) from disk when a batch needs
    them (`attrjax.data.RecordFeature`). Images stay JPEG-encoded; no TensorFlow needed.

    Returns:
      LabeledImages with (N, 20) multi-hot labels from the annotations (difficult objects counted unless
      `include_difficult=False`), and masks for the `segmentation` config.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown VOC split {split!r}; VOC 2012 trainval has {', '.join(SPLITS)}")
    builder = _builder(data_dir, config)
    problem = prepared.unfinished(builder)
    if problem is not None:
        raise FileNotFoundError(f"voc2012/{config} is not built in {os.fspath(data_dir)} ({problem}); build it with "
                                f"`{_build_command(data_dir)}` after placing {TARBALL} in the manual directory")
    skip = {"image": tfds.decode.SkipDecoding()}
    if config == "segmentation":
        skip["segmentation_mask"] = tfds.decode.SkipDecoding()
    remedy = (f"delete {builder.data_path} and build it again: `{_build_command(data_dir)}` (add --manual_dir DIR "
              f"unless {TARBALL} or VOCdevkit/ is in {os.path.join(os.fspath(data_dir), 'downloads', 'manual')})")

    def small_fields(record: dict) -> tuple[tuple[int, int], np.ndarray, str]:
        labels = multi_hot(record["objects"]["label"], record["objects"]["difficult"], include_difficult)
        return Image.open(io.BytesIO(record["image"])).size[::-1], labels, record["image/filename"].decode()

    sizes, labels, names = zip(*prepared.read_records(builder, split, remedy, decoders=skip, keep=small_fields))
    return LabeledImages(
        images=prepared.RecordFeature(builder, split, "image", remedy),
        sizes=np.array(sizes),
        labels=np.stack(labels),
        names=list(names),
        masks=prepared.RecordFeature(builder, split, "segmentation_mask", remedy) if config == "segmentation" else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attrjax.data.voc", description="Build PASCAL VOC 2012.")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
    parser.add_argument("--manual_dir", default=None,
                        help=f"where {TARBALL} or VOCdevkit/ is (default <data_dir>/downloads/manual)")
    args = parser.parse_args(argv)
    try:
        build_voc(args.data_dir, manual_dir=args.manual_dir)
    except (VocLayoutError, ValueError) as error:  # bad input: the message says what to do, a traceback would not
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
