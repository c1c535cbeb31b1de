"""Whether a TFDS array_record build on disk is finished and whole; building it again; reading it file by file, or
record by record where a batch needs it.

TFDS writes a build into a temporary `incomplete.XXXXXX_<version>` folder beside the version folder and renames it
once every shard and `dataset_info.json` are written. A Python exception (KeyboardInterrupt included) deletes the
temporary folder; a killed process (SIGKILL, the out-of-memory killer, a pre-empted machine) leaves it behind. A
version folder without `dataset_info.json` (a partial copy, a deleted file) is no build TFDS can read, yet
`download_and_prepare` sees the folder and returns without building anything.
"""

from __future__ import annotations

import collections.abc
import os
import pathlib
import shutil
import time
from typing import Callable, TypeVar, overload

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from google.protobuf.message import DecodeError
from tensorflow_datasets.core import constants
from tensorflow_datasets.proto import tf_example_pb2

Builder = TypeVar("Builder", bound=tfds.core.DatasetBuilder)
Kept = TypeVar("Kept")
_SCAN_CHUNK = 256  # records decoded at once while scanning a file: bounds the memory of a scan


def unfinished(builder: tfds.core.DatasetBuilder) -> str | None:
    """Why `builder.data_path` holds no finished build, or None when its `dataset_info.json` is there."""
    data_path = pathlib.Path(builder.data_path)
    if not data_path.is_dir():
        return f"there is no {data_path}"
    if not (data_path / constants.DATASET_INFO_FILENAME).is_file():
        return (f"{data_path} has no {constants.DATASET_INFO_FILENAME}, so it is no finished build (a partial "
                "copy? files deleted from it?)")
    return None


def damaged_shard(path: pathlib.Path, num_records: int) -> str | None:
    """Why the array_record file `path` does not hold `num_records` readable records, or None when it does."""
    if not path.is_file():
        return f"{path} is missing"
    # A damaged file fails to open (too short for a footer) or opens and reports not ok / too few records.
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        found = reader.num_records() if reader.ok() else 0
        reader.close()
    except RuntimeError:
        found = 0
    if found != num_records:
        return f"{path} is corrupt or truncated ({found} readable records, expected {num_records})"
    return None


def build_problem(builder: tfds.core.DatasetBuilder) -> str | None:
    """Why `builder.data_path` is not a finished build with every shard whole, or None when it is.

    Checks each shard's record count, not its contents: damage inside a record surfaces in `read_records`.
    """
    problem = unfinished(builder)
    if problem is not None:
        return problem
    for split_info in builder.info.splits.values():
        for filename, num_records in zip(split_info.filenames, split_info.shard_lengths):
            problem = damaged_shard(pathlib.Path(builder.data_path, filename), num_records)
            if problem is not None:
                return problem
    return None


def leftover_folders(builder: tfds.core.DatasetBuilder) -> list[pathlib.Path]:
    """The temporary folders that killed builds of `builder`'s config and version left beside its data_path."""
    return sorted(pathlib.Path(builder.data_path).parent.glob(f"{constants.INCOMPLETE_PREFIX}*_{builder.version}"))


def build_or_reuse(make_builder: Callable[[], Builder], label: str, prepare: Callable[[Builder], None]) -> Builder:
    """Reuses the build of `make_builder()` if it is finished and whole, else deletes what is there and builds it.

    For datasets that are ours to rebuild. `prepare(builder)` runs `builder.download_and_prepare`; `label` starts
    every line printed. Our builders show the progress of their examples themselves (`attrjax._progress.track`), so
    TFDS's own progress bars are turned off (`tfds.disable_progress_bar()`) before a build. The temporary folders
    of killed builds are deleted: once a finished build is in place, a build still writing one could not rename it
    into place anyway.
    """
    builder = make_builder()
    data_path = pathlib.Path(builder.data_path)
    problem = build_problem(builder)
    if problem is None:
        print(f"{label}: reusing {data_path}")
    else:
        if data_path.exists():
            print(f"{label}: {problem}; deleting {data_path} to build it again")
            shutil.rmtree(data_path)
            builder = make_builder()  # afresh: the old one may hold the info of what was deleted
        print(f"{label}: building {data_path}")
        tfds.disable_progress_bar()
        start = time.perf_counter()
        prepare(builder)
        problem = build_problem(builder)
        if problem is not None:
            raise RuntimeError(f"{label}: building {data_path} returned, but {problem}")
        print(f"{label}: built in {time.perf_counter() - start:.1f} s")
    for folder in leftover_folders(builder):
        print(f"{label}: deleting {folder}, left by a build that was killed before it finished")
        shutil.rmtree(folder)
    return builder


def read_records(builder: tfds.core.DatasetBuilder, split: str, remedy: str, decoders: dict | None = None,
                 keep: Callable[[dict], Kept] | None = None) -> list[Kept]:
    """``keep(record)`` of every record of `split` ('train', 'train[:10]', 'train+test'), read one file at a time
    and at most a few hundred records at once (``keep`` None: the records themselves).

    With a ``keep`` that keeps a record's small fields only (its label, its image's size), a scan of a split of any
    size holds a few hundred records in memory at most; `RecordFeature` then reads the large fields back one
    record at a time. A file that is missing, short of records or does not decode raises ValueError naming it,
    followed by `remedy` (what to do about it).
    """
    source = builder.as_data_source(split, decoders=decoders)  # this also picks the array_record files to read
    kept: list = []
    for instruction in builder.info.splits[split].file_instructions:
        path = pathlib.Path(instruction.filename)
        problem = damaged_shard(path, instruction.examples_in_shard)
        if problem is not None:
            raise ValueError(f"{problem}; {remedy}")
        first, end = len(kept), len(kept) + instruction.take  # this file's records, numbered across the split
        for start in range(first, end, _SCAN_CHUNK):
            stop = min(start + _SCAN_CHUNK, end)
            try:
                records = source.__getitems__(list(range(start, stop)))
            except (RuntimeError, ValueError) as error:
                raise ValueError(f"could not decode {path} ({error}); {remedy}") from error
            kept += records if keep is None else [keep(record) for record in records]
    return kept


class RecordFeature(collections.abc.Sequence):
    """One encoded (bytes) feature of every record of a split, read from its array_record files when an item is
    asked for.

        images = RecordFeature(builder, "train", "image")
        images[7]        # the encoded image of record 7, read now; images[2:5] reads three

    Nothing is held in memory but the files' indices, so a split of any size costs no memory, and a stream reads
    exactly the records its batches draw (per-record random access, as grain's data sources do). It travels to
    grain's worker processes (it pickles as the split's file paths) and may be read from several threads at once.

    TFDS stores a record as a serialized ``tf.train.Example``; only the feature asked for is taken from it (~20 us a
    record here, where decoding every feature of a VOC record through TFDS takes ~200 us, a tenth of decoding its
    JPEG). That this gives TFDS's own bytes is checked on the first record when it is made.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, feature: str,
                 remedy: str = "build the dataset again"):
        """``feature``: a feature of ``builder`` stored as one encoded value (an image, a mask), read undecoded;
        ``remedy``: what to do when a record cannot be read (its files were changed or damaged after loading)."""
        if feature not in builder.info.features:
            raise KeyError(f"{builder.info.full_name} has no feature {feature!r}; it has "
                           f"{', '.join(builder.info.features)}")
        self.source = builder.as_data_source(split, decoders={feature: tfds.decode.SkipDecoding()})
        self.feature = feature
        self.remedy = remedy
        if len(self) and self[0] != self.source[0][feature]:
            raise RuntimeError(f"{builder.info.full_name}: the {feature!r} bytes of record 0 differ from what "
                               "tensorflow-datasets reads; this version of it stores records in a way attrjax does "
                               "not know")

    def _feature_of(self, serialized: bytes) -> bytes:
        example = tf_example_pb2.Example.FromString(serialized)
        return example.features.feature[self.feature].bytes_list.value[0]

    def __len__(self) -> int:
        return len(self.source)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index):
        records = self.source.data_source  # the serialized records
        try:
            if isinstance(index, slice):
                positions = list(range(*index.indices(len(self))))
                return [self._feature_of(record) for record in records.__getitems__(positions)] if positions else []
            position = int(index)
            if not -len(self) <= position < len(self):
                raise IndexError(f"record {index} of {len(self)}")
            return self._feature_of(records[position % len(self)])
        except (RuntimeError, ValueError, DecodeError) as error:
            raise ValueError(f"could not read record {index} of {self!r} ({error}); {self.remedy}") from error

    def __repr__(self) -> str:
        where = f"{self.source.dataset_info.full_name}/{self.source.split}"
        return f"RecordFeature({self.feature!r} of {where}, {len(self)} records)"
