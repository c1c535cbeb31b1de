"""TFDS builder for the synthetic shapes dataset, stored as array_record and read back without TensorFlow.

    build_shapes("/data")                       # renders and writes train/val/localization once (seconds)
    train = load_split("/data", "train")        # dict of NumPy arrays: image, mask, labels

or from a shell: `python -m attrjax.data.builder --data_dir /data`.

Every split carries masks; `localization` holds images kept apart for evaluating attributions only. Example i
of split s is example i of `render_split(shapes, n, split_seed(seed, s))`, so no split depends on the sizes of
the others. Each combination of shapes options, split sizes and seed is its own TFDS config, named from those
values, so builds of different sizes live side by side in one data_dir.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from attrjax.data import _prepared as prepared
from attrjax.data._shapes import ShapesConfig, render_example
from attrjax._progress import track

SPLITS = ("train", "val", "localization")
"""The synthetic dataset's splits: training, validation (classification) and localisation (attribution scores)."""
_FEATURES = ("image", "mask", "labels")
_DEFAULT_SPLIT_SIZES = {"num_train": 6000, "num_val": 1000, "num_localization": 500}


def split_seed(seed: int, split: str) -> int:
    """The `render_split` seed of `split` in a dataset built with `seed`; distinct for every (seed, split)."""
    return seed * len(SPLITS) + SPLITS.index(split)


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesBuilderConfig(tfds.core.BuilderConfig):
    """Everything that determines the dataset on disk; the config name is derived from it."""

    name: str = dataclasses.field(init=False, default="")
    shapes: ShapesConfig = ShapesConfig()
    num_train: int = _DEFAULT_SPLIT_SIZES["num_train"]
    num_val: int = _DEFAULT_SPLIT_SIZES["num_val"]
    num_localization: int = _DEFAULT_SPLIT_SIZES["num_localization"]
    seed: int = 0

    def __post_init__(self):
        for split in SPLITS:
            if self.split_size(split) < 1:
                raise ValueError(f"num_{split} must be at least 1, got {self.split_size(split)}")
        if not 0 <= split_seed(self.seed, SPLITS[-1]) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32 // {len(SPLITS)}), got {self.seed}")
        self.name = self._derived_name()

    def split_size(self, split: str) -> int:
        """The number of examples of ``split`` (``train``, ``val``, ...)."""
        return getattr(self, f"num_{split}")

    def _derived_name(self) -> str:
        # Readable for the values people change, plus a digest of every value so that no two configs collide.
        values = dataclasses.asdict(self.shapes) | {"seed": self.seed}
        values |= {f"num_{split}": self.split_size(split) for split in SPLITS}
        digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
        sizes = "-".join(str(self.split_size(split)) for split in SPLITS)
        return f"px{self.shapes.image_size}_k{self.shapes.num_classes}_n{sizes}_seed{self.seed}_{digest}"


class AttrjaxShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic multi-label shapes with per-pixel masks (see `attrjax.data.render_example`)."""

    # Bump when the renderer changes what a (config, seed, index) renders to, so old builds are not reused.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS locates the builder's source only to find URL checksums, and nothing is downloaded here. Its
        # lookup needs the `importlib_resources` backport and fails on namespace packages, so skip it.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        size, num_classes = self.builder_config.shapes.image_size, self.builder_config.shapes.num_classes
        # BYTES encoding stores each array as one blob instead of one int64 per pixel: ~8x faster to write.
        as_bytes = tfds.features.Encoding.BYTES
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding=as_bytes),
            "mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding=as_bytes),
            "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.bool_),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=features,
            disable_shuffling=True,  # record i is example i, as rendered by render_split
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        seed = split_seed(config.seed, split)
        total = config.split_size(split)
        for index in track(range(total), total, description=f"attrjax_shapes: rendering {split}", unit="image"):
            yield index, render_example(np.random.default_rng([seed, index]), config.shapes)


def _builder(data_dir: str | os.PathLike, config: ShapesBuilderConfig) -> AttrjaxShapes:
    return AttrjaxShapes(config=config, data_dir=os.fspath(data_dir), file_format="array_record")


def build_shapes(
    data_dir: str | os.PathLike,
    *,
    shapes: ShapesConfig = ShapesConfig(),
    num_train: int = _DEFAULT_SPLIT_SIZES["num_train"],
    num_val: int = _DEFAULT_SPLIT_SIZES["num_val"],
    num_localization: int = _DEFAULT_SPLIT_SIZES["num_localization"],
    seed: int = 0,
) -> AttrjaxShapes:
    """Renders and writes the dataset under `data_dir` unless a whole build is there; returns the builder.

    A half-built or damaged build (no dataset_info.json, a shard missing or short of records) is deleted and built
    again, as are the temporary folders of killed builds: the dataset is rendered deterministically, so the rebuild
    is the same dataset.
    """
    config = ShapesBuilderConfig(
        shapes=shapes, num_train=num_train, num_val=num_val, num_localization=num_localization, seed=seed
    )
    return prepared.build_or_reuse(lambda: _builder(data_dir, config), "attrjax_shapes",
                                   lambda builder: builder.download_and_prepare())


def _build_command(data_dir: str | os.PathLike, config: ShapesBuilderConfig) -> str:
    """The shell command that builds `config`, naming only the options that differ from their defaults."""
    options = [f"--data_dir {os.fspath(data_dir)}"]
    for field in dataclasses.fields(ShapesConfig):
        if getattr(config.shapes, field.name) != field.default:
            options.append(f"--{field.name} {getattr(config.shapes, field.name)}")
    for option, default in _DEFAULT_SPLIT_SIZES.items():
        if getattr(config, option) != default:
            options.append(f"--{option} {getattr(config, option)}")
    if config.seed != 0:
        options.append(f"--seed {config.seed}")
    return "python -m attrjax.data.builder " + " ".join(options)


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    *,
    shapes: ShapesConfig = ShapesConfig(),
    num_train: int = _DEFAULT_SPLIT_SIZES["num_train"],
    num_val: int = _DEFAULT_SPLIT_SIZES["num_val"],
    num_localization: int = _DEFAULT_SPLIT_SIZES["num_localization"],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Reads a built split through the TFDS array_record data source (no TensorFlow).

    The keyword arguments name the build to read, as given to `build_shapes`.

    Returns:
      dict with `image` uint8 (N, H, W, 3), `mask` uint8 (N, H, W), `labels` bool (N, K).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; attrjax_shapes has splits {', '.join(SPLITS)}")
    if not pathlib.Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"data_dir {os.fspath(data_dir)} does not exist; build the dataset into it first with "
            f"build_shapes({os.fspath(data_dir)!r}, ...) or `python -m attrjax.data.builder --data_dir DIR`"
        )
    config = ShapesBuilderConfig(
        shapes=shapes, num_train=num_train, num_val=num_val, num_localization=num_localization, seed=seed
    )
    builder = _builder(data_dir, config)
    command = _build_command(data_dir, config)
    problem = prepared.unfinished(builder)
    if problem is not None:
        raise FileNotFoundError(
            f"attrjax_shapes is not built in {os.fspath(data_dir)} with these options ({problem}); run "
            f"build_shapes(...) with the same arguments or `{command}`"
        )
    remedy = (f"delete {builder.data_path} and build it again: `{command}` or build_shapes(...) with the same "
              "arguments")
    records: list[dict] = prepared.read_records(builder, split, remedy)
    return {name: np.stack([record[name] for record in records]) for name in _FEATURES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m attrjax.data.builder", description="Build the attrjax synthetic shapes dataset."
    )
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
    for field in dataclasses.fields(ShapesConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    for option, default in _DEFAULT_SPLIT_SIZES.items():
        parser.add_argument(f"--{option}", type=int, default=default)
    parser.add_argument("--seed", type=int, default=0)
    args = vars(parser.parse_args(argv))
    shapes = ShapesConfig(**{field.name: args.pop(field.name) for field in dataclasses.fields(ShapesConfig)})
    build_shapes(args.pop("data_dir"), shapes=shapes, **args)


if __name__ == "__main__":
    main()
