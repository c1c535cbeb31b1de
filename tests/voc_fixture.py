"""A tiny PASCAL VOC 2012 tree in the official layout: real JPEGs, palette PNG masks, annotation XML, ImageSets."""

import pathlib
import tarfile

import numpy as np
from PIL import Image

from attrjax.data.voc import CLASS_NAMES, TARBALL, palette_colours

# id -> (height, width, objects as (class name, difficult)); sizes differ so resizing and cropping are exercised.
IMAGES = {
    "2008_000001": (30, 40, [("dog", False), ("person", False)]),
    "2008_000002": (36, 24, [("cat", False), ("cat", True)]),
    "2008_000003": (20, 20, [("bus", True)]),
    "2008_000004": (28, 34, [("aeroplane", False), ("tvmonitor", False)]),
    "2008_000005": (32, 32, [("sheep", False), ("person", True)]),
}
MAIN = {"train": ["2008_000001", "2008_000002", "2008_000003"], "val": ["2008_000004", "2008_000005"]}
SEGMENTATION = {"train": ["2008_000001"], "val": ["2008_000004", "2008_000005"]}


def expected_labels(image_id: str, include_difficult: bool = True) -> np.ndarray:
    labels = np.zeros(len(CLASS_NAMES), bool)
    for name, difficult in IMAGES[image_id][2]:
        if include_difficult or not difficult:
            labels[CLASS_NAMES.index(name)] = True
    return labels


def expected_mask(image_id: str) -> np.ndarray:
    """Each object a horizontal band of its class index (c + 1), a void outline (255) around the first band."""
    height, width, objects = IMAGES[image_id]
    mask = np.zeros((height, width), np.uint8)
    band = height // (len(objects) + 1)
    for k, (name, _) in enumerate(objects):
        mask[k * band + 2:(k + 1) * band, 3:width - 3] = CLASS_NAMES.index(name) + 1
    mask[1, 2:width - 2] = 255
    return mask


def image_pixels(image_id: str) -> np.ndarray:
    height, width, _ = IMAGES[image_id]
    rng = np.random.default_rng(int(image_id[-3:]))
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _annotation(image_id: str) -> str:
    height, width, objects = IMAGES[image_id]
    parts = [f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
             "<segmented>0</segmented>"]
    for name, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                     f"<xmax>{width}</xmax><ymax>{height}</ymax></bndbox></object>")
    return "\n".join(parts + ["</annotation>"])


def palette_png(mask: np.ndarray, path: pathlib.Path):
    """Writes class indices as a palette PNG, as VOC's SegmentationClass files are (255 = the void colour)."""
    image = Image.fromarray(mask, mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[:21] = palette_colours()
    palette[255] = (224, 224, 192)
    image.putpalette(palette.reshape(-1).tolist())
    image.save(path)


def write_voc_tree(root: pathlib.Path) -> pathlib.Path:
    """Writes `root/VOCdevkit/VOC2012` and returns it."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    for image_id in IMAGES:
        Image.fromarray(image_pixels(image_id)).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_annotation(image_id))
    for ids in SEGMENTATION.values():
        for image_id in ids:
            palette_png(expected_mask(image_id), voc / "SegmentationClass" / f"{image_id}.png")
    for image_set, lists in (("Main", MAIN), ("Segmentation", SEGMENTATION)):
        for split, ids in lists.items():
            (voc / "ImageSets" / image_set / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc


def write_voc_tarball(root: pathlib.Path, manual_dir: pathlib.Path, top: str = "VOCdevkit") -> pathlib.Path:
    """The tree of `write_voc_tree(root)` packed as the official archive (VOCdevkit/ at its top) in manual_dir."""
    write_voc_tree(root)
    manual_dir.mkdir(parents=True, exist_ok=True)
    tarball = manual_dir / TARBALL
    with tarfile.open(tarball, "w") as archive:
        archive.add(root / "VOCdevkit", arcname=top)
    return tarball
