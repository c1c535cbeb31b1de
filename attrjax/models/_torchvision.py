"""torchvision / reference-code VGG checkpoints <-> attrjax ``VGG`` variables.

The paper's teacher starts from torchvision's ImageNet ``vgg16_bn`` (``vgg16_bn-6c64b313.pth``) with a new
Dropout + Linear(C*H*W, 20) head; the reference code's VOC checkpoints keep torchvision's key layout. A state dict
here is a flat ``{key: np.ndarray}`` in PyTorch layout (conv weights OIHW, linear weights (out, in)):

- ``features.{i}.weight`` (O,I,3,3) / ``.bias`` (O,): a conv; ``features.{i+1}.weight/bias/running_mean/running_var``
  (O,) and optionally ``num_batches_tracked`` (): its BatchNorm; ``features.{i+2}``: its ReLU (no entries); one more
  index, a max-pool (no entries), closes every stage. This is torchvision's ``make_layers(cfg, batch_norm=True)``.
- ``classifier.1.weight`` (K, F) / ``.bias`` (K,): the reference code's head, Dropout (index 0) + Linear. ``F`` is
  C*H*W of the last pool, flattened in C,H,W order, which ``VGG.head`` also uses, so the Dense kernel is the
  transposed weight (or F = C for a ``head_pooling="avg"`` model).
- torchvision's ImageNet head ``classifier.0/3/6`` (Linear 25088->4096->4096->1000) has hidden FC layers that
  attrjax's VGG does not have. As in the paper it is dropped and the new head keeps a fresh init: pass
  ``new_head_variables=init_variables(model, key)`` to ``import_vgg``.

Files: ``.safetensors``, ``.npz`` and PyTorch ``.pth``/``.pt``/``.pth.tar``. PyTorch files load with ``torch`` when
it is installed (``weights_only=True``), otherwise with ``read_pth_without_torch``, a restricted unpickler for the
zip format (torch>=1.6) and the legacy format (torch<1.6, which torchvision's ImageNet files use) that refuses
every global but tensors, storages and ``OrderedDict``: no code from the file ever runs.

Nothing is cast silently: an entry named like a float parameter or statistic (``*.weight``, ``*.bias``,
``*.running_mean``, ``*.running_var``) with an integer or bool dtype is refused by the readers (naming the file)
and by ``import_vgg``; integer buffers such as ``num_batches_tracked`` are read as they are (and ignored by
``import_vgg``). Tensors with NaN or inf values are read but reported with a ``RuntimeWarning`` naming them:
they are data a user may want to inspect, but a model built from them computes NaN.

A file cannot make the readers allocate more than it says it holds, nor more than a limit: before any array is
read, what the file claims is checked. ``max_bytes`` (default ``MAX_STATE_DICT_BYTES``, 4 GiB; pass a larger
``max_bytes`` to ``load_state_dict`` / ``read_pth_without_torch`` for a bigger genuine checkpoint) bounds the
arrays' total: an ``.npz``'s arrays (from each ``.npy`` header, before decompressing), a ``.pth``'s tensors and,
separately, the storages they are cut from, a ``.safetensors`` file's size (its tensors fill it exactly: the
safetensors library checks the header's offsets against the file). An ``.npz`` array's header must also match its
zip member's uncompressed size. In a ``.pth`` read without torch each storage's bytes must match the element count
the pickle claims for it, and each tensor must lie inside its storage and not repeat its elements (a stride-0 or
overlapping view, as ``expand()`` makes, lets a few bytes claim gigabytes): such files are refused, naming the
tensor and what is wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from attrjax.models._vgg import VGG, StageWidths, init_variables

StateDict = dict[str, np.ndarray]

MAX_STATE_DICT_BYTES = 4 * 2**30
"""Default ``max_bytes`` of the readers: at most this many bytes of arrays per file (VGG16 is 0.55 GB)."""

# ---------------------------------------------------------------------------------------------------------------
# Reading and writing files


def load_state_dict(path: str | Path, *, max_bytes: int = MAX_STATE_DICT_BYTES) -> StateDict:
    """Reads a flat state dict ``{key: array}`` from ``.safetensors``, ``.npz`` or ``.pth``/``.pt``/``.pth.tar``.

    PyTorch files use ``torch.load(..., weights_only=True)`` when torch is importable, else
    ``read_pth_without_torch``. A training checkpoint ``{'state_dict': {...}, 'epoch': ...}`` yields its
    ``state_dict``. bfloat16 tensors come back as float32.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one that cannot be read,
    is not a flat state dict, has integer / bool weights, or claims more than it holds or more than ``max_bytes``
    bytes of arrays (see the module docstring; raise ``max_bytes`` for a bigger genuine file); warns about NaN / inf.
    """
    path = Path(path)
    kind = _file_kind(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if kind == "safetensors":
        safetensors_numpy = _safetensors_numpy()  # outside _read_checked: a missing package is not the file's fault
        return _read_checked(path, lambda p: _read_safetensors(safetensors_numpy, p, max_bytes))
    if kind == "npz":
        return _read_checked(path, lambda p: _read_npz(p, max_bytes))
    torch = _torch_or_none()
    if torch is None:
        return read_pth_without_torch(path, max_bytes=max_bytes)
    return _read_checked(path, lambda p: _read_pth_with_torch(torch, p, max_bytes))


def read_pth_without_torch(path: str | Path, *, max_bytes: int = MAX_STATE_DICT_BYTES) -> StateDict:
    """Reads a PyTorch ``.pth`` state dict without importing torch (zip format of torch>=1.6, or legacy format).

    Only tensors (``torch._utils._rebuild_tensor[_v2|_v3]``, ``_rebuild_parameter``), storage types, dtypes and
    ``collections.OrderedDict`` may appear in the pickle; any other global raises ``pickle.UnpicklingError``
    before anything is called. Tensors are copied out of their storages (offset, size, stride) once every tensor
    and storage is checked (see the module docstring); bfloat16 becomes float32. Errors and warnings as
    ``load_state_dict``'s.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    return _read_checked(path, lambda p: _read_zip_pth(p, max_bytes) if zipfile.is_zipfile(p)
                         else _read_legacy_pth(p, max_bytes))


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Writes ``state_dict`` as ``.safetensors`` or ``.npz``; ``.pth``/``.pt`` needs torch (``torch.save``)."""
    path = Path(path)
    kind = _file_kind(path)
    arrays: dict[str, Any] = {key: np.asarray(value, order="C") for key, value in state_dict.items()}  # 0-d stays 0-d
    if kind == "safetensors":
        _safetensors_numpy().save_file(arrays, str(path))
    elif kind == "npz":
        with open(path, "wb") as file:  # a file object: np.savez would append .npz to a path without that suffix
            np.savez(file, **arrays)
    else:
        torch = _torch_or_none()
        if torch is None:
            raise ValueError(f"writing {path.name} needs PyTorch, which is not installed; save as .safetensors or "
                             ".npz instead (both load in PyTorch with safetensors.torch.load_file / numpy)")
        torch.save(collections.OrderedDict((key, torch.from_numpy(np.array(value))) for key, value in arrays.items()),
                   path)  # np.array: a writable copy, as torch.from_numpy wants


_SUFFIXES = {".safetensors": "safetensors", ".npz": "npz", ".pth": "pth", ".pt": "pth", ".pth.tar": "pth"}


def _file_kind(path: Path) -> str:
    for suffix, kind in _SUFFIXES.items():
        if path.name.endswith(suffix):
            return kind
    raise ValueError(f"unsupported checkpoint file {str(path)!r}: use one of {', '.join(_SUFFIXES)}")


def _check_total(claims: Mapping[str, int], max_bytes: int, what: str) -> None:
    """Refuses ``claims`` (name -> bytes a file claims for it) adding up to more than ``max_bytes``."""
    total = sum(claims.values())
    if total > max_bytes:
        largest = sorted(claims, key=lambda name: -claims[name])[:3]
        raise ValueError(f"its {what} take {total:,} bytes together (largest: "
                         f"{', '.join(f'{name} {claims[name]:,}' for name in largest)}), over max_bytes={max_bytes:,}"
                         "; a damaged or crafted file claims more than it holds. If the file is genuine and memory "
                         "allows, pass a larger max_bytes to load_state_dict / read_pth_without_torch")


def _read_safetensors(safetensors_numpy, path: Path, max_bytes: int) -> StateDict:
    _check_total({path.name: path.stat().st_size}, max_bytes, "tensors (the whole file, which they fill)")
    return safetensors_numpy.load_file(str(path))


def _read_npz(path: Path, max_bytes: int) -> StateDict:
    """The arrays of an ``np.savez`` file, read once every member's ``.npy`` header is checked."""
    with zipfile.ZipFile(path) as archive:
        members = {_npz_key(info.filename): info for info in archive.infolist()}
        _check_total({key: _npy_data_bytes(archive, key, info) for key, info in members.items()}, max_bytes,
                     "arrays")
        arrays = {}
        for key, info in members.items():
            with archive.open(info) as file:
                arrays[key] = np.lib.format.read_array(file, allow_pickle=False)
        return arrays


def _npz_key(member: str) -> str:
    if not member.endswith(".npy"):
        raise ValueError(f"member {member!r} is not a .npy array; a state dict .npz holds only arrays (np.savez)")
    return member[:-len(".npy")]


def _npy_data_bytes(archive: zipfile.ZipFile, key: str, info: zipfile.ZipInfo) -> int:
    """The bytes of array ``key``'s data, from its ``.npy`` header (decompressing only the header), refused unless
    the header and the data fill the zip member's uncompressed size exactly and the dtype holds no objects."""
    with archive.open(info) as file:
        version = np.lib.format.read_magic(file)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"array {key} is in .npy format {version}; re-save it with np.savez")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _fortran_order, dtype = read_header(file)
        header_bytes = file.tell()
    if dtype.hasobject:
        raise ValueError(f"array {key} holds Python objects ({dtype}), which would need unpickling; refusing it: "
                         "save numeric arrays only")
    data_bytes = math.prod(shape) * dtype.itemsize
    if header_bytes + data_bytes != info.file_size:
        raise ValueError(f"array {key} claims shape {shape} of {dtype} ({data_bytes:,} bytes) but its zip member "
                         f"holds {info.file_size - header_bytes:,} bytes of data; the file is damaged or crafted: "
                         "re-save it with np.savez")
    return data_bytes


def _read_checked(path: Path, read: Callable[[Path], Any]) -> StateDict:
    """``read(path)`` as a checked flat state dict (``_state_dict_from``). Whatever the parser raises about the
    file's content (a third-party library's error, a truncated pickle, a missing zip member) is re-raised as a
    ValueError naming ``path``; a refused pickle global and OS errors (which name the file) pass unchanged."""
    try:
        loaded = read(path)
    except (_RefusedGlobal, OSError):
        raise
    except Exception as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    return _state_dict_from(loaded, path)


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError as error:
        raise ImportError("reading/writing .safetensors needs the safetensors package: pip install safetensors") \
            from error
    return safetensors.numpy


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _read_pth_with_torch(torch, path: Path, max_bytes: int) -> Any:
    """``torch.load`` (weights only), with the tensors' total checked before they are copied into NumPy."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    _check_total({key: x.numel() * x.element_size() for key, x in _leaves(loaded) if isinstance(x, torch.Tensor)},
                 max_bytes, "tensors")
    return _map_tree(loaded, lambda x: _torch_to_numpy(torch, x))


def _torch_to_numpy(torch, x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy().copy()


def _map_tree(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Applies ``fn`` to every leaf of nested dicts / lists / tuples (the containers a pickle can hold)."""
    if isinstance(obj, Mapping):
        return {key: _map_tree(value, fn) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tree(value, fn) for value in obj)
    return fn(obj)


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` of every leaf of nested dicts / lists / tuples; a path joins keys and indices with "/"."""
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        yield prefix, obj
        return
    for key, value in items:
        yield from _leaves(value, f"{prefix}/{key}" if prefix else str(key))


def _state_dict_from(loaded: Any, path: Path) -> StateDict:
    """The flat ``{str: array}`` in ``loaded``: itself, or its ``state_dict`` entry (a training checkpoint)."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict {{name: tensor}}")
    not_arrays = [str(key) for key, value in loaded.items() if not isinstance(value, np.ndarray)]
    if not_arrays:
        raise ValueError(f"{path} is not a flat state dict: entries {', '.join(not_arrays)} are not tensors")
    state_dict = {str(key): value for key, value in loaded.items()}
    not_float = _non_float_weights(state_dict)
    if not_float:
        raise ValueError(f"{path} has integer or bool tensors where float weights are expected ({len(not_float)}): "
                         f"{_listing(not_float)}. {_NOT_FLOAT_ADVICE}")
    nonfinite = [key for key, value in state_dict.items() if not np.all(np.isfinite(value))]
    if nonfinite:
        warnings.warn(f"{path}: {len(nonfinite)} tensors hold NaN or inf values: {_listing(nonfinite)}; a model "
                      "built from them computes NaN (was the checkpoint saved after training diverged?)",
                      RuntimeWarning)
    return state_dict


_FLOAT_LEAVES = ("weight", "bias", "running_mean", "running_var")
_NOT_FLOAT_ADVICE = ("Weights are never cast from integers (a quantised or non-weight file would import as "
                     "plausible garbage): save the float model's state dict (float16/32/64 or bfloat16) instead.")


def _non_float_weights(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """``"key (dtype)"`` of every entry named like a float parameter or statistic (``*.weight``, ``*.bias``,
    ``*.running_mean``, ``*.running_var``) whose dtype is not floating point (bfloat16 counts as floating)."""
    return [f"{key} ({np.asarray(value).dtype})" for key, value in state_dict.items()
            if key.rsplit(".", 1)[-1] in _FLOAT_LEAVES and not jnp.issubdtype(np.asarray(value).dtype, jnp.floating)]


# ---------------------------------------------------------------------------------------------------------------
# The torch-free .pth reader

_DTYPES = {
    "float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage in the file: raw bytes under ``key``, ``numel`` elements of ``dtype`` as the pickle claims, seen
    from ``offset`` elements in (a legacy view)."""
    key: str
    dtype: np.dtype
    offset: int
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class _PendingTensor:
    """A tensor to cut out of its storage once the storages are read (the legacy format stores them last)."""
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride), dtype)  # untyped (byte) storage


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


# The only globals a state-dict pickle may name, each mapped to an inert stand-in (nothing from torch is called).
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "UntypedStorage"): _DTYPES["uint8"],
    ("torch.storage", "UntypedStorage"): _DTYPES["uint8"],
    **{("torch", name): _DTYPES[dtype] for name, dtype in _STORAGE_DTYPES.items()},  # typed storages
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},  # dtypes (_rebuild_tensor_v3)
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside ``_SAFE_GLOBALS``."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals (to inert local stand-ins); storages come from ``storage_ref``."""

    def __init__(self, file, path: Path, storage_ref: Callable[[tuple], _StorageRef] | None = None):
        super().__init__(file, encoding="utf-8")  # Python 2 pickles (old torch) hold byte strings
        self._path = path
        self._storage_ref = storage_ref

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise _RefusedGlobal(
                f"{self._path} references {module}.{name}, which is not a tensor, storage or OrderedDict; refusing "
                "to unpickle it (it could run code). Only plain state dicts can be read. If you trust the file, "
                "re-save just its state dict with PyTorch: torch.save(torch.load(path, weights_only=False)"
                "['state_dict'], 'weights.pth')")
        return _SAFE_GLOBALS[(module, name)]

    def persistent_load(self, pid: Any) -> _StorageRef:
        if self._storage_ref is None or not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} (only tensor storages)")
        return self._storage_ref(pid)


def _storage_dtype(storage_type: Any) -> np.dtype:
    """A persistent id's storage type, which ``find_class`` resolved to a NumPy dtype."""
    if not isinstance(storage_type, np.dtype):
        raise pickle.UnpicklingError(f"a tensor storage has type {storage_type!r}, not a torch storage type")
    return storage_type


def _storage_numel(numel: Any) -> int:
    """A persistent id's claimed element count of its storage."""
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"a tensor storage claims {numel!r} elements, not a count")
    return numel


def _read_zip_pth(path: Path, max_bytes: int) -> Any:
    """torch>=1.6 files: ``<name>/data.pkl`` with storages ``<name>/data/<key>`` and an optional ``byteorder``."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError("a zip file but not a PyTorch checkpoint (no single data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in archive.namelist():
            byteorder = archive.read(prefix + "byteorder").decode().strip()

        def storage_ref(pid: tuple) -> _StorageRef:
            _, storage_type, key, _location, numel = pid
            return _StorageRef(str(key), _storage_dtype(storage_type), 0, _storage_numel(numel))

        with archive.open(pickles[0]) as file:
            loaded = _RestrictedUnpickler(file, path, storage_ref).load()
        tensors = _checked_tensors(loaded, max_bytes)
        buffers = {}
        for storage in _storages(tensors).values():
            name = f"{prefix}data/{storage.key}"
            stored = archive.getinfo(name).file_size
            if stored != storage.nbytes:
                raise ValueError(f"{_storage_claim(storage, tensors)} but its zip member {name} holds {stored:,} "
                                 f"bytes; {_RESAVE}")
            buffers[storage.key] = archive.read(name)
    return _materialise(loaded, buffers, byteorder)


def _read_legacy_pth(path: Path, max_bytes: int) -> Any:
    """torch<1.6 files: magic, protocol, sys_info, the object, the storage keys, then each storage's raw data."""
    with open(path, "rb") as file:
        try:
            magic = _RestrictedUnpickler(file, path).load()
        except _RefusedGlobal:
            raise
        except Exception as error:  # whatever garbage does to an unpickler: not a checkpoint
            raise ValueError(f"neither a zip nor a legacy PyTorch checkpoint ({error!r})") from error
        if magic != _LEGACY_MAGIC:
            raise ValueError("neither a zip nor a legacy PyTorch checkpoint (bad magic number)")
        protocol = _RestrictedUnpickler(file, path).load()
        if protocol != _LEGACY_PROTOCOL:
            raise ValueError(f"unsupported legacy PyTorch protocol {protocol} (expected {_LEGACY_PROTOCOL})")
        sys_info = _RestrictedUnpickler(file, path).load()
        if not isinstance(sys_info, dict):
            raise ValueError(f"malformed legacy PyTorch header (sys_info is a {type(sys_info).__name__})")
        byteorder = "little" if sys_info.get("little_endian", True) else "big"

        def storage_ref(pid: tuple) -> _StorageRef:
            _, storage_type, root_key, _location, numel, view_metadata = pid
            view_offset = 0 if view_metadata is None else view_metadata[1]  # (view_key, offset, numel)
            return _StorageRef(str(root_key), _storage_dtype(storage_type), view_offset, _storage_numel(numel))

        loaded = _RestrictedUnpickler(file, path, storage_ref).load()
        tensors = _checked_tensors(loaded, max_bytes)
        storages = _storages(tensors)
        buffers = {}
        for key in _RestrictedUnpickler(file, path).load():
            key = str(key)
            if key not in storages:
                raise ValueError(f"storage {key!r} is listed but no tensor uses it")
            (count,) = struct.unpack("<q" if byteorder == "little" else ">q", file.read(8))
            if count != storages[key].numel:
                raise ValueError(f"{_storage_claim(storages[key], tensors)} but its data says {count:,}; {_RESAVE}")
            left = path.stat().st_size - file.tell()
            if storages[key].nbytes > left:
                raise ValueError(f"the file is truncated: storage {key!r} needs {storages[key].nbytes:,} bytes, "
                                 f"{left:,} are left")
            buffers[key] = file.read(storages[key].nbytes)
    return _materialise(loaded, buffers, byteorder)


_RESAVE = ("the file is damaged or was crafted to claim more than it holds: load it where it was made and re-save "
           "the state dict with torch.save(model.state_dict(), path)")


def _checked_tensors(loaded: Any, max_bytes: int) -> dict[str, _PendingTensor]:
    """The tensors in ``loaded`` by path, once each is checked against its storage's claimed size
    (``_view_problem``) and the tensors' and the storages' totals against ``max_bytes``."""
    tensors = {key: x for key, x in _leaves(loaded) if isinstance(x, _PendingTensor)}
    for key, tensor in tensors.items():
        problem = _view_problem(tensor)
        if problem:
            raise ValueError(f"tensor {key} (size {tensor.size}, stride {tensor.stride}, offset "
                             f"{tensor.storage.offset + tensor.offset}) {problem}")
    _check_total({key: math.prod(tensor.size) * tensor.dtype.itemsize for key, tensor in tensors.items()},
                 max_bytes, "tensors")
    _check_total({f"storage {key}": storage.nbytes for key, storage in _storages(tensors).items()}, max_bytes,
                 "storages")
    return tensors


def _storages(tensors: Mapping[str, _PendingTensor]) -> dict[str, _StorageRef]:
    return {tensor.storage.key: tensor.storage for tensor in tensors.values()}


def _storage_claim(storage: _StorageRef, tensors: Mapping[str, _PendingTensor]) -> str:
    users = [key for key, tensor in tensors.items() if tensor.storage.key == storage.key]
    return (f"storage {storage.key!r} (of tensor {_listing(users)}) claims {storage.numel:,} {storage.dtype} "
            f"elements ({storage.nbytes:,} bytes)")


def _view_problem(tensor: _PendingTensor) -> str | None:
    """What is wrong with ``tensor``'s view of its storage, or None: its geometry must be non-negative integers,
    stay inside the storage's claimed elements, and reach no element twice (sufficient test: sorted by stride,
    each dimension steps past everything the smaller strides reach; every view torch makes by slicing, permuting
    or transposing passes)."""
    start = tensor.storage.offset + tensor.offset
    numbers = (start, *tensor.size, *tensor.stride)
    if len(tensor.size) != len(tensor.stride) or not all(isinstance(n, int) and n >= 0 for n in numbers):
        return f"has an invalid geometry; {_RESAVE}"
    if math.prod(tensor.size) == 0:
        return None
    elements = tensor.storage.nbytes // tensor.dtype.itemsize
    last = start + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= elements:
        return f"reads element {last:,} of a storage of {elements:,} elements; {_RESAVE}"
    reach = 0
    for stride, size in sorted((s, n) for n, s in zip(tensor.size, tensor.stride) if n > 1):
        if stride <= reach:
            return ("repeats elements of its storage (a stride-0 or overlapping view, as expand() makes), which "
                    "lets a few bytes claim gigabytes; refusing it: save a contiguous copy in the state dict "
                    "(tensor.contiguous())")
        reach += stride * (size - 1)
    return None


def _materialise(loaded: Any, buffers: Mapping[str, bytes], byteorder: str) -> Any:
    """``loaded`` with each pending tensor copied out of its storage's bytes in ``buffers``."""
    return _map_tree(loaded, lambda x: _tensor_from_buffer(buffers[x.storage.key], x, byteorder)
                     if isinstance(x, _PendingTensor) else x)


def _tensor_from_buffer(buffer: bytes, tensor: _PendingTensor, byteorder: str) -> np.ndarray:
    """Copies a strided view out of a storage's bytes (checked by ``_view_problem``: as_strided checks nothing)."""
    flat = np.frombuffer(buffer, dtype=tensor.dtype)
    if byteorder != sys.byteorder and tensor.dtype.itemsize > 1:
        flat = flat.byteswap()
    if math.prod(tensor.size) == 0:
        array = np.zeros(tensor.size, tensor.dtype)
    else:
        array = np.lib.stride_tricks.as_strided(flat[tensor.storage.offset + tensor.offset:], shape=tensor.size,
                                                strides=[s * flat.itemsize for s in tensor.stride]).copy()
    return array.astype(np.float32) if tensor.dtype == _DTYPES["bfloat16"] else array


# ---------------------------------------------------------------------------------------------------------------
# torchvision layout <-> attrjax VGG variables

_NUM_BATCHES_TRACKED = None  # marks the optional BatchNorm counter, which attrjax does not keep
# torchvision's ImageNet head and the reference code's head; dropped when a new head is given.
_CLASSIFIER_KEYS = tuple(f"classifier.{i}.{leaf}" for i in (0, 1, 3, 6) for leaf in ("weight", "bias"))
# PyTorch -> Flax axis order by rank: conv OIHW -> HWIO, linear (out, in) -> (in, out); and back.
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}
_LISTED = 20  # keys / shapes an error lists before "... and N more" (a wrong architecture mismatches hundreds)


def _key_map(model: VGG) -> dict[str, tuple[str, str, str] | None]:
    """torchvision key -> (collection, module, leaf) of ``model``'s variables, in torchvision's order."""
    keys: dict[str, tuple[str, str, str] | None] = {}
    index = 0
    for s, stage in enumerate(model.stage_widths, start=1):
        for j in range(1, len(stage) + 1):
            conv, bn = f"features.{index}", f"features.{index + 1}"
            keys[f"{conv}.weight"] = ("params", f"conv{s}_{j}", "kernel")
            keys[f"{conv}.bias"] = ("params", f"conv{s}_{j}", "bias")
            keys[f"{bn}.weight"] = ("params", f"bn{s}_{j}", "scale")
            keys[f"{bn}.bias"] = ("params", f"bn{s}_{j}", "bias")
            keys[f"{bn}.running_mean"] = ("batch_stats", f"bn{s}_{j}", "mean")
            keys[f"{bn}.running_var"] = ("batch_stats", f"bn{s}_{j}", "var")
            keys[f"{bn}.num_batches_tracked"] = _NUM_BATCHES_TRACKED
            index += 3  # conv, BatchNorm, ReLU
        index += 1  # the stage's max-pool
    keys["classifier.1.weight"] = ("params", "classifier", "kernel")
    keys["classifier.1.bias"] = ("params", "classifier", "bias")
    return keys


def _flax_shapes(model: VGG) -> dict[tuple[str, ...], tuple[int, ...]]:
    """(collection, module, leaf) -> shape of ``model``'s variables (no computation: ``jax.eval_shape``)."""
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return {(collection, module, leaf): tuple(x.shape) for collection, modules in variables.items()
            for module, leaves in modules.items() for leaf, x in leaves.items()}


def _permute(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in axes)


def stage_widths_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> StageWidths:
    """Conv widths per stage of a torchvision-layout VGG-with-BatchNorm state dict (e.g. to build the model).

    Stages are read from the index gaps: 3 between convs of a stage (conv, BN, ReLU), 4 across a max-pool.
    ``vgg(stage_widths_from_state_dict(sd), num_classes=..., image_size=...)`` builds a matching model.
    """
    state_dict = _strip_data_parallel_prefix(state_dict)
    convs = sorted((int(key.split(".")[1]), value.shape[0]) for key, value in state_dict.items()
                   if key.startswith("features.") and key.endswith(".weight") and np.ndim(value) == 4)
    if not convs:
        raise ValueError("the state dict has no conv weights features.{i}.weight: not a torchvision VGG")
    if convs[0][0] != 0:
        raise ValueError(f"the first conv is features.{convs[0][0]}, expected features.0")
    stages: list[list[int]] = [[]]
    for position, (index, width) in enumerate(convs):
        if f"features.{index + 1}.running_mean" not in state_dict:
            raise ValueError(f"features.{index} is a conv without a BatchNorm at features.{index + 1}: attrjax's "
                             "VGG has BatchNorm after every conv (torchvision vgg*_bn, not vgg*)")
        if position:
            gap = index - convs[position - 1][0]
            if gap not in (3, 4):
                raise ValueError(f"convs features.{convs[position - 1][0]} and features.{index} are {gap} indices "
                                 "apart; torchvision VGG convs are 3 apart within a stage and 4 across a max-pool")
            if gap == 4:
                stages.append([])
        stages[-1].append(int(width))
    return tuple(tuple(stage) for stage in stages)


def _strip_data_parallel_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the ``module.`` prefix ``torch.nn.DataParallel`` puts on every key (the reference code's files)."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def import_vgg(state_dict: Mapping[str, np.ndarray], model: VGG, *,
               new_head_variables: Mapping[str, Any] | None = None) -> dict:
    """torchvision-layout state dict -> ``{'params', 'batch_stats'}`` for ``model`` (float32).

    Args:
      state_dict: ``features.*`` convs and BatchNorms in forward order (``num_batches_tracked`` optional and
        ignored; keys may carry DataParallel's ``module.`` prefix) plus, unless ``new_head_variables`` is given,
        the reference head ``classifier.1.weight`` (K, F) / ``classifier.1.bias`` (K,).
      model: the VGG to fill; its stage widths, ``num_classes``, ``image_size`` and ``head_pooling`` must match.
      new_head_variables: variables of ``model`` (e.g. ``init_variables(model, key)``) whose
        ``params['classifier']`` becomes the head. The checkpoint's classifier, torchvision's ImageNet
        ``classifier.0/3/6`` or a ``classifier.1``, is then dropped, as the paper does for its teacher.

    Everything is checked before anything is built; a ``ValueError`` lists missing keys, unexpected keys, wrong
    shapes (PyTorch layout) and integer / bool weights with what to change. float16, float64 and bfloat16
    weights are converted to float32; integers are never cast. ``import_vgg(export_vgg(v, model), model) == v``.
    """
    state_dict = _strip_data_parallel_prefix(state_dict)
    key_map = _key_map(model)
    flax_shapes = _flax_shapes(model)
    if new_head_variables is not None:
        _check_new_head(new_head_variables, flax_shapes)
        key_map = {key: source for key, source in key_map.items() if not key.startswith("classifier.")}
        state_dict = {key: value for key, value in state_dict.items() if key not in _CLASSIFIER_KEYS}
    _check_state_dict(state_dict, model, key_map, flax_shapes)

    variables: dict[str, dict[str, dict[str, jax.Array]]] = {"params": {}, "batch_stats": {}}
    for key, source in key_map.items():
        if source is _NUM_BATCHES_TRACKED:
            continue
        collection, module, leaf = source
        value = np.asarray(state_dict[key], np.float32)
        variables[collection].setdefault(module, {})[leaf] = jnp.asarray(np.transpose(value, _TO_FLAX[value.ndim]))
    if new_head_variables is not None:
        variables["params"]["classifier"] = {leaf: jnp.asarray(x, jnp.float32) for leaf, x in
                                             new_head_variables["params"]["classifier"].items()}
    return variables


def export_vgg(variables: Mapping[str, Any], model: VGG) -> StateDict:
    """``{'params', 'batch_stats'}`` of ``model`` -> torchvision / reference-code state dict (float32 NumPy).

    Keys and layouts as ``import_vgg`` reads them (``features.*``, ``classifier.1.*``; OIHW convs, (K, F) linear),
    with ``num_batches_tracked`` = int64 0 so ``torch.nn.Module.load_state_dict`` accepts it strictly.
    """
    return state_dict_from_variables(variables, _key_map(model), _flax_shapes(model), _describe(model),
                                     hint="pass the variables this model's init_variables or import_vgg returned")


def state_dict_from_variables(variables: Mapping[str, Any], key_map: Mapping[str, tuple[str, ...] | None],
                              shapes: Mapping[tuple[str, ...], tuple[int, ...]], description: str, *, hint: str
                              ) -> StateDict:
    """Flax variables -> torchvision state dict (float32, torch layouts), shared by the VGG and ResNet exports.

    ``key_map``: torch key -> the variable's path (collection, module..., leaf), or ``_NUM_BATCHES_TRACKED`` for
    BatchNorm's counter (written as int64 0 so ``load_state_dict`` accepts the dict strictly); ``shapes``: path ->
    the flax shape the model expects. Raises one ValueError listing every missing or misshapen variable.
    """
    flat = flax.traverse_util.flatten_dict(variables)
    state_dict: StateDict = {}
    problems = []
    for key, path in key_map.items():
        if path is _NUM_BATCHES_TRACKED:
            state_dict[key] = np.zeros((), np.int64)
            continue
        value = flat.get(path)
        if value is None or tuple(np.shape(value)) != shapes[path]:
            found = "missing" if value is None else f"shape {tuple(np.shape(value))}"
            problems.append(f"{'/'.join(path)}: {found}, the model expects {shapes[path]}")
            continue
        value = np.asarray(value, np.float32)
        state_dict[key] = np.ascontiguousarray(np.transpose(value, _TO_TORCH[value.ndim]))
    if problems:
        raise ValueError(f"variables do not fit {description} ({len(problems)} problems):\n  "
                         + "\n  ".join(problems[:_LISTED]) + f"\n  hint: {hint}")
    return state_dict


def _describe(model: VGG) -> str:
    return (f"VGG(stage_widths={model.stage_widths}, num_classes={model.num_classes}, "
            f"image_size={model.image_size}, head_pooling={model.head_pooling!r})")


def _check_new_head(new_head_variables: Mapping[str, Any], flax_shapes: Mapping, *, head: str = "classifier",
                    init: str = "init_variables(model, key)") -> None:
    """Refuses ``new_head_variables`` unless they hold this model's ``params/<head>`` kernel and bias (``init``: how
    to make them, for the message)."""
    given = new_head_variables.get("params", {}).get(head, {})
    for leaf in ("kernel", "bias"):
        expected = flax_shapes[("params", head, leaf)]
        if leaf not in given or tuple(np.shape(given[leaf])) != expected:
            raise ValueError(f"new_head_variables must be variables of this model, e.g. {init}: "
                             f"params/{head}/{leaf} should have shape {expected}")


def _check_state_dict(state_dict: Mapping[str, np.ndarray], model: VGG, key_map: Mapping, flax_shapes: Mapping
                      ) -> None:
    required = {key: _permute(flax_shapes[source], _TO_TORCH[len(flax_shapes[source])])
                for key, source in key_map.items() if source is not _NUM_BATCHES_TRACKED}
    check_state_dict_fits(state_dict, required, key_map, _describe(model),
                          lambda wrong: _hints(state_dict, model, wrong))


WrongShape = tuple[str, tuple[int, ...], tuple[int, ...]]  # (key, shape in the checkpoint, shape the model expects)


def check_state_dict_fits(state_dict: Mapping[str, np.ndarray], required: Mapping[str, tuple[int, ...]],
                          known_keys, description: str, hints: Callable[[list[WrongShape]], list[str]]) -> None:
    """Raises one ValueError listing every way ``state_dict`` does not fit a model: missing and unexpected keys
    (``required``: key -> torch shape; ``known_keys``: every key the model reads or ignores), wrong shapes,
    non-float weights, then ``hints(wrong shapes)``; ``description`` names the model."""
    missing = [key for key in required if key not in state_dict]
    unexpected = [key for key in state_dict if key not in known_keys]
    wrong = [(key, tuple(np.shape(state_dict[key])), shape) for key, shape in required.items()
             if key in state_dict and tuple(np.shape(state_dict[key])) != tuple(shape)]
    not_float = _non_float_weights(state_dict)
    if not (missing or unexpected or wrong or not_float):
        return
    lines = [f"cannot import this state dict into {description}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if not_float:
        lines.append(f"  not floating point ({len(not_float)}): {_listing(not_float)}. {_NOT_FLOAT_ADVICE}")
    for key, found, expected in wrong[:_LISTED]:
        lines.append(f"  wrong shape: {key} is {found} in the checkpoint, the model expects {expected}")
    if len(wrong) > _LISTED:
        lines.append(f"  ... and {len(wrong) - _LISTED} more wrong shapes")
    lines += [f"  hint: {hint}" for hint in hints(wrong)]
    raise ValueError("\n".join(lines))


def _listing(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def _hints(state_dict: Mapping[str, np.ndarray], model: VGG, wrong: list) -> list[str]:
    hints = []
    try:
        widths = stage_widths_from_state_dict(state_dict)
        if widths != model.stage_widths:
            hints.append(f"the checkpoint's conv widths per stage are {widths}, the model's {model.stage_widths}; "
                         "build the model with vgg(stage_widths_from_state_dict(state_dict), ...)")
    except ValueError as error:
        hints.append(f"the checkpoint's features are not a torchvision VGG-with-BatchNorm: {error}")
    if "classifier.0.weight" in state_dict:  # (import_vgg has dropped it if a new head was given)
        hints.append("the checkpoint has torchvision's ImageNet classifier (classifier.0/3/6, two hidden FC "
                     "layers), which attrjax's VGG does not have; import the features only and start a new head, "
                     "as the paper does: import_vgg(state_dict, model, new_head_variables=init_variables(model, key))")
    head_shape = next((found for key, found, _ in wrong if key == "classifier.1.weight"), None)
    if head_shape is not None and len(head_shape) == 2:
        hints += _classifier_hints(head_shape, model)
    return hints


def _classifier_hints(shape: tuple[int, int], model: VGG) -> list[str]:
    """Why a ``classifier.1.weight`` of ``shape`` (K, F) does not fit ``model``'s head, and what to build instead."""
    classes, inputs = shape
    hints = []
    if classes != model.num_classes:
        hints.append(f"the checkpoint's head predicts {classes} classes, the model {model.num_classes}: build the "
                     f"model with num_classes={classes}, or drop the head with new_head_variables="
                     "init_variables(model, key)")
    channels = model.stage_widths[-1][-1]
    side = math.isqrt(inputs // channels)
    pools = 2 ** len(model.stage_widths)
    if inputs != channels * side * side:
        hints.append(f"the checkpoint's head takes {inputs} inputs, not C*H*W of a square map with the model's "
                     f"{channels} last-conv channels")
    elif model.head_pooling == "avg" and side > 1:
        hints.append(f"the checkpoint's head flattens a {side}x{side} map (C,H,W), the model pools globally: build "
                     f"it with head_pooling='flatten' and image_size in [{side * pools}, {(side + 1) * pools - 1}]")
    elif model.head_pooling == "flatten" and side == 1:
        hints.append(f"the checkpoint's head takes {channels} inputs, one per channel: a globally pooled head; build "
                     "the model with head_pooling='avg'")
    elif model.head_pooling == "flatten" and side != model.final_spatial_size:
        hints.append(f"the checkpoint's head was built for a {side}x{side} last pool (image_size "
                     f"{side * pools}-{(side + 1) * pools - 1} px), the model's is "
                     f"{model.final_spatial_size}x{model.final_spatial_size} (image_size {model.image_size})")
    return hints


__all__ = ["load_state_dict", "read_pth_without_torch", "save_state_dict", "import_vgg", "export_vgg",
           "stage_widths_from_state_dict"]
