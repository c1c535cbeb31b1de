"""Throughput of the natural-image training pipeline (JPEG decode + RandomResizedCrop + flip + normalise).

    python -m benchmarks.input_pipeline [--workers 0 1 2 4] [--threads 1 4] [--voc-data-dir DIR] [--out result.json]

The paper's recipe decodes ~12 M VOC JPEGs in all (README "Reproducing the paper"); this says how many grain
processes and threads keep an accelerator fed. By default the images are synthetic VOC-sized JPEGs (500 x 375,
smooth content, ~60 KB), held in memory; ``--voc-data-dir`` uses a built VOC 2012 train split instead, each setting
twice: its images read per record from the array_record files as training reads them ("disk") and held in memory
("memory"). Prints one JSON object: images per second for each (grain worker processes, threads per process,
storage) setting and its ratio to the first (same images, same batches, measured in one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import time

import numpy as np
from PIL import Image

from attrjax.data import VOC_NORMALIZATION, LabeledImages, random_resized_crop_batches
from attrjax.data.voc import load_voc
from benchmarks import common


def synthetic_jpegs(count: int, height: int, width: int, seed: int = 0) -> LabeledImages:
    """``count`` JPEGs of upsampled noise (photo-like file sizes and decode cost), one label each."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    labels = np.eye(20, dtype=bool)[np.arange(count) % 20]
    names = [f"synthetic{i}" for i in range(count)]
    return LabeledImages(images=images, sizes=np.array([(height, width)] * count), labels=labels, names=names)


def voc_images(data_dir: str) -> dict[str, LabeledImages]:
    """A built VOC train split, its images read from the array_record files per record as training reads them
    ("disk"), and the same split with its images read into memory first ("memory")."""
    on_disk = load_voc(data_dir, "train")
    return {"disk": on_disk, "memory": dataclasses.replace(on_disk, images=on_disk.images[:])}


def images_per_second(split: LabeledImages, batch_size: int, image_size: int, workers: int, threads: int,
                      steps: int) -> float:
    """Images/s of the stream after its first batch (which starts the workers and fills the read-ahead)."""
    batches = random_resized_crop_batches(split, batch_size, image_size=image_size, seed=0,
                                          normalization=VOC_NORMALIZATION, workers=workers, threads=threads)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="grain worker processes (0: batches built in this process)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="batches built at once per process")
    parser.add_argument("--images", type=int, default=128, help="synthetic images cycled through")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--steps", type=int, default=4, help="timed batches per setting")
    parser.add_argument("--voc-data-dir", default=None, help="a data_dir with voc2012/main built")
    common.add_output_flag(parser)
    args = parser.parse_args(argv)
    if args.voc_data_dir:
        splits = voc_images(args.voc_data_dir)
    else:
        splits = {"memory": synthetic_jpegs(args.images, 375, 500)}
    rates = {f"workers={workers},threads={threads},{storage}": images_per_second(split, args.batch, args.image_size,
                                                                                 workers, threads, args.steps)
             for workers in args.workers for threads in args.threads for storage, split in splits.items()}
    baseline = next(iter(rates.values()))
    result = {
        "benchmark": "input_pipeline",
        "source": "voc2012 train" if args.voc_data_dir else "synthetic 500x375 JPEG",
        "images": len(splits["memory"]),
        "mean_jpeg_kb": float(np.mean([len(image) for image in splits["memory"].images]) / 1e3),
        "batch": args.batch, "image_size": args.image_size, "cpu_count": os.cpu_count(),
        "images_per_s": rates,
        "ratio_to_first": {setting: rate / baseline for setting, rate in rates.items()},
    }
    common.emit(common.round_floats(result), args.out)


if __name__ == "__main__":
    main()
