"""torchvision VGG checkpoints: logits equal an independent NumPy forward and PyTorch's own; the torch-free reader
reads zip and legacy .pth files and refuses foreign globals; export/import round-trips; bad checkpoints fail clearly."""

import importlib.util
import io
import os
import pickle
import pickletools
import re
import types
import zipfile
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy

from tests import draws
from attrjax.models import _torchvision as torchvision
from attrjax.models import export_vgg, import_vgg, init_variables, load_state_dict, save_state_dict, vgg
from attrjax.models._torchvision import read_pth_without_torch, stage_widths_from_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "torchvision"
CFG = (4, "M", 8, 8, "M")  # torchvision's make_layers notation, as in fixtures/make_torch_checkpoints.py
WIDTHS = ((4,), (8, 8))
IMAGE_SIZE, NUM_CLASSES = 16, 3
FLAT = 8 * 4 * 4  # C*H*W of the last pool


def _random_state_dict(seed, cfg=CFG, num_classes=NUM_CLASSES, flat=FLAT):
    """torchvision-layout VGG-BN state dict (OIHW convs, random BN statistics) with the reference code's head."""
    rng = np.random.default_rng(seed)
    state_dict, index, channels = {}, 0, 3
    for v in cfg:
        if v == "M":
            index += 1
            continue
        state_dict[f"features.{index}.weight"] = rng.normal(0, 0.3, (v, channels, 3, 3)).astype(np.float32)
        state_dict[f"features.{index}.bias"] = rng.normal(0, 0.1, v).astype(np.float32)
        bn = f"features.{index + 1}"
        state_dict[f"{bn}.weight"] = rng.uniform(0.5, 1.5, v).astype(np.float32)
        state_dict[f"{bn}.bias"] = rng.normal(0, 0.2, v).astype(np.float32)
        state_dict[f"{bn}.running_mean"] = rng.normal(0, 0.2, v).astype(np.float32)
        state_dict[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, v).astype(np.float32)
        state_dict[f"{bn}.num_batches_tracked"] = np.array(11, np.int64)
        index, channels = index + 3, v
    state_dict["classifier.1.weight"] = rng.normal(0, 0.1, (num_classes, flat)).astype(np.float32)
    state_dict["classifier.1.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return state_dict


def _numpy_logits(state_dict, images_nchw, cfg=CFG):
    """Float64 forward straight from the PyTorch-layout arrays: conv3x3 pad 1, BN (eps 1e-5), ReLU, 2x2 max-pool,
    C,H,W flatten, linear."""
    sd = {key: value.astype(np.float64) for key, value in state_dict.items()}
    x, index = images_nchw.astype(np.float64), 0
    for v in cfg:
        if v == "M":
            b, c, h, w = x.shape
            x = x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
            index += 1
            continue
        weight, bias = sd[f"features.{index}.weight"], sd[f"features.{index}.bias"]
        b, c, h, w = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((b, v, h, w))
        for dy in range(3):
            for dx in range(3):
                out += np.einsum("bchw,oc->bohw", padded[:, :, dy:dy + h, dx:dx + w], weight[:, :, dy, dx])
        x = out + bias[None, :, None, None]
        bn = {name: sd[f"features.{index + 1}.{name}"][None, :, None, None]  # broadcast over (B, C, H, W)
              for name in ("weight", "bias", "running_mean", "running_var")}
        x = (x - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
        x = np.maximum(x, 0.0)
        index += 3
    return x.reshape(x.shape[0], -1) @ sd["classifier.1.weight"].T + sd["classifier.1.bias"]


def _model(widths=WIDTHS, **overrides):
    return vgg(widths, **{"num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, **overrides})


def _logits(model, variables, images_nchw):
    return np.asarray(model.apply(variables, np.transpose(images_nchw, (0, 2, 3, 1))))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_imported_logits_equal_an_independent_numpy_forward(tmp_path, suffix):
    state_dict = _random_state_dict(0)
    path = tmp_path / f"teacher{suffix}"
    if suffix == ".safetensors":
        safetensors.numpy.save_file(state_dict, str(path))
    else:
        np.savez(path, **state_dict)
    model = _model()
    variables = import_vgg(load_state_dict(path), model)
    images = np.random.default_rng(1).normal(size=(2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    chex.assert_trees_all_close(_logits(model, variables, images), _numpy_logits(state_dict, images),
                                rtol=1e-4, atol=1e-5)


def test_data_parallel_prefix_and_layout_inference():
    state_dict = _random_state_dict(0)
    prefixed = {f"module.{key}": value for key, value in state_dict.items()}
    assert stage_widths_from_state_dict(prefixed) == WIDTHS
    chex.assert_trees_all_equal(import_vgg(prefixed, _model()), import_vgg(state_dict, _model()))


@pytest.mark.parametrize("name", ["tiny_vgg_zip.pth", "tiny_vgg_legacy.pth"])
def test_torch_saved_checkpoints_reproduce_torch_logits_without_torch(name):
    reference = np.load(FIXTURES / "tiny_vgg_reference.npz")
    assert tuple(-1 if v == "M" else v for v in CFG) == tuple(reference["cfg"])
    state_dict = read_pth_without_torch(FIXTURES / name)
    assert state_dict["features.1.num_batches_tracked"] == 7
    model = _model()
    chex.assert_trees_all_close(_logits(model, import_vgg(state_dict, model), reference["images"]),
                                reference["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dtypes_zip.pth", "dtypes_legacy.pth"])
def test_torch_free_reader_handles_dtypes_and_strided_views(name):
    expected = np.load(FIXTURES / "dtypes_expected.npz")
    loaded = read_pth_without_torch(FIXTURES / name)
    keys = [key for key in expected.files if key != "uint16" or "zip" in name]  # torch writes uint16 only in zips
    assert list(loaded) == keys
    for key in keys:
        assert loaded[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(loaded[key], expected[key], err_msg=key)


def test_imagenet_classifier_is_dropped_and_the_new_head_kept():
    state_dict = _random_state_dict(0)
    del state_dict["classifier.1.weight"], state_dict["classifier.1.bias"]
    rng = np.random.default_rng(2)
    for index, shape in ((0, (32, FLAT)), (3, (32, 32)), (6, (1000, 32))):  # torchvision's 3-layer ImageNet head
        state_dict[f"classifier.{index}.weight"] = rng.normal(size=shape).astype(np.float32)
        state_dict[f"classifier.{index}.bias"] = rng.normal(size=shape[:1]).astype(np.float32)
    model = _model(head_pooling="avg")  # any head: only the features are imported
    fresh = init_variables(model, jax.random.key(3))
    variables = import_vgg(state_dict, model, new_head_variables=fresh)
    chex.assert_trees_all_equal(variables["params"]["classifier"], fresh["params"]["classifier"])
    np.testing.assert_array_equal(variables["params"]["conv2_2"]["kernel"],
                                  state_dict["features.7.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["bn2_2"]["var"], state_dict["features.8.running_var"])
    with pytest.raises(ValueError, match=r"(?s)missing keys \(2\): classifier.1.weight.*ImageNet classifier.*"
                                         r"new_head_variables=init_variables"):
        import_vgg(state_dict, model)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_export_save_load_import_round_trips_exactly(tmp_path, suffix):
    model = _model()
    variables = init_variables(model, jax.random.key(0))
    variables["batch_stats"] = jax.tree.map(lambda x: x + draws.uniform(jax.random.key(1), x.shape),
                                            variables["batch_stats"])
    exported = export_vgg(variables, model)
    assert list(exported) == list(_random_state_dict(0))  # torchvision's keys, in torchvision's order
    assert exported["features.5.num_batches_tracked"].dtype == np.int64
    assert exported["features.5.num_batches_tracked"] == 0
    path = tmp_path / f"exported{suffix}"
    save_state_dict(exported, path)
    loaded = load_state_dict(path)
    chex.assert_trees_all_equal(loaded, exported, strict=True)  # num_batches_tracked stays a 0-d int64
    chex.assert_trees_all_equal(import_vgg(loaded, model), variables, strict=True)


@pytest.mark.parametrize("change,model_overrides,message", [
    (lambda sd: sd.pop("features.5.running_var"), {}, r"missing keys \(1\): features.5.running_var"),
    (lambda sd: sd.update({"features.99.weight": np.zeros(3, np.float32)}), {},
     r"unexpected keys \(1\): features.99.weight"),
    (lambda sd: sd.update(_random_state_dict(0, num_classes=5)), {},
     r"(?s)classifier.1.weight is \(5, 128\) in the checkpoint, the model expects \(3, 128\).*num_classes=5"),
    (lambda sd: None, {"head_pooling": "avg"}, r"(?s)expects \(3, 8\).*head_pooling='flatten'"),
    (lambda sd: None, {"image_size": 24}, r"(?s)expects \(3, 288\).*built for a 4x4 last pool"),
    (lambda sd: None, {"widths": ((4,), (8, 8, 8))}, r"(?s)missing keys.*features.10.weight.*"
                                                     r"conv widths per stage are \(\(4,\), \(8, 8\)\)"),
])
def test_mismatched_checkpoints_fail_clearly(change, model_overrides, message):
    state_dict = _random_state_dict(0)
    change(state_dict)
    with pytest.raises(ValueError, match=message):
        import_vgg(state_dict, _model(**model_overrides))


def test_new_head_variables_must_fit_the_model():
    other = _model(num_classes=7)
    with pytest.raises(ValueError, match=r"new_head_variables must be variables of this model"):
        import_vgg(_random_state_dict(0), _model(), new_head_variables=init_variables(other, jax.random.key(0)))


class _RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_foreign_pickle_globals_are_refused_not_run(tmp_path, layout):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsAShellCommand(f"touch {marker}"), protocol=2)
    path = tmp_path / "evil.pth"
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    else:
        header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
        path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in header) + payload)
    with pytest.raises(pickle.UnpicklingError, match=r"references (posix|nt|os)\.system.*refusing"):
        read_pth_without_torch(path)
    assert not marker.exists()


def test_missing_files_and_unsupported_formats_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match=rf"unsupported checkpoint file '{re.escape(str(tmp_path))}/weights.h5'.*"
                                         r"\.safetensors"):
        load_state_dict(tmp_path / "weights.h5")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a zip nor a legacy PyTorch checkpoint"):
        read_pth_without_torch(garbage)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch writes .pth when installed")
def test_writing_pth_without_torch_says_what_to_use(tmp_path):
    with pytest.raises(ValueError, match=r"needs PyTorch.*\.safetensors or \.npz"):
        save_state_dict(_random_state_dict(0), tmp_path / "weights.pth")


def _rewrite_zip(source, target, change):
    """Copies the zip ``source`` to ``target`` with ``change(name, data) -> data | None`` (None drops the member)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            data = change(name, src.read(name))
            if data is not None:
                dst.writestr(name, data)


DAMAGED = ("garbage.safetensors", "garbage.npz", "objects.npz", "cut_in_pickle.pth", "cut_in_storage_count.pth",
           "storage_missing.pth", "garbage_pickle.pth")


def _write_damaged(tmp_path, name):
    """Writes the damaged file ``name`` of ``DAMAGED`` (each fails inside a third-party parser or the unpickler)."""
    path = tmp_path / name
    legacy = (FIXTURES / "tiny_vgg_legacy.pth").read_bytes()
    stream = io.BytesIO(legacy)
    for _ in range(5):  # magic, protocol, sys_info, the state dict, the storage keys
        for _ in pickletools.genops(stream):
            pass
    first_storage = stream.tell()  # its 8-byte element count, then its data
    contents = {"garbage.safetensors": b"garbage!" * 4, "garbage.npz": b"garbage!" * 4,
                "cut_in_pickle.pth": legacy[:200], "cut_in_storage_count.pth": legacy[:first_storage + 4]}
    if name in contents:
        path.write_bytes(contents[name])
    elif name == "objects.npz":
        np.savez(path, weight=np.array([1, "x"], object))
    elif name == "storage_missing.pth":
        _rewrite_zip(FIXTURES / "tiny_vgg_zip.pth", path, lambda member, data: None if member.endswith("/data/0")
                     else data)
    else:
        _rewrite_zip(FIXTURES / "tiny_vgg_zip.pth", path,
                     lambda member, data: b"\x80\x02garbage" if member.endswith("data.pkl") else data)
    return path


@pytest.mark.parametrize("name", DAMAGED)
def test_every_error_reading_a_file_names_it(tmp_path, name):
    path = _write_damaged(tmp_path, name)
    for reader in (load_state_dict, read_pth_without_torch) if name.endswith(".pth") else (load_state_dict,):
        with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(path))}: ."):
            reader(path)


def test_torch_load_errors_name_the_file(tmp_path, monkeypatch):
    def failing_load(*args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    fake_torch = types.SimpleNamespace(load=failing_load, Tensor=type("Tensor", (), {}))
    monkeypatch.setattr(torchvision, "_torch_or_none", lambda: fake_torch)
    path = tmp_path / "broken.pth"
    path.write_bytes(b"PK")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*failed finding central directory"):
        load_state_dict(path)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_integer_weights_are_refused_not_cast(tmp_path, suffix, dtype):
    state_dict = _random_state_dict(0)
    state_dict["features.4.weight"] = np.ones_like(state_dict["features.4.weight"], dtype)
    path = tmp_path / f"quantised{suffix}"
    save_state_dict(state_dict, path)
    name = np.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"(?s){re.escape(str(path))}.*features\.4\.weight \({name}\).*float"):
        load_state_dict(path)
    # In memory there is no file to name, but import_vgg refuses the cast as well.
    with pytest.raises(ValueError, match=rf"(?s)not floating point.*features\.4\.weight \({name}\)"):
        import_vgg(state_dict, _model())


@pytest.mark.parametrize("name", ["tiny_vgg_zip.pth", "tiny_vgg_legacy.pth"])
def test_integer_storages_in_pth_files_are_refused(tmp_path, name):
    # Re-typing the float storages as 32-bit int ones (same width) makes every float tensor an int32 tensor.
    path = tmp_path / name
    if name.endswith("zip.pth"):
        _rewrite_zip(FIXTURES / name, path, lambda member, data: data.replace(b"\nFloatStorage\n", b"\nIntStorage\n")
                     if member.endswith("data.pkl") else data)
    else:
        path.write_bytes((FIXTURES / name).read_bytes().replace(b"\nFloatStorage\n", b"\nIntStorage\n"))
    with pytest.raises(ValueError, match=rf"(?s){re.escape(str(path))}.*features\.0\.weight \(int32\)"):
        read_pth_without_torch(path)


def test_nonfinite_weights_are_reported_with_their_keys(tmp_path):
    state_dict = _random_state_dict(0)
    state_dict["features.0.weight"][1, 2, 0, 0] = np.nan
    state_dict["features.5.running_var"][:] = np.inf
    path = tmp_path / "diverged.npz"
    save_state_dict(state_dict, path)
    with pytest.warns(RuntimeWarning, match=rf"{re.escape(str(path))}: 2 tensors hold NaN or inf values: "
                                            r"features\.0\.weight, features\.5\.running_var"):
        loaded = load_state_dict(path)
    chex.assert_trees_all_equal(loaded, state_dict)  # reported, not altered


# ---------------------------------------------------------------------------------------------------------------
# Files that claim more than they hold (or more than max_bytes) are refused before anything big is allocated.


def _ops(value):
    """The pickle opcodes that push ``value`` (an int, str or tuple of them): a protocol-2 pickle minus PROTO/STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module, name):
    return f"c{module}\n{name}\n".encode()


def _write_one_tensor_pth(path, size, stride, numel, data, compress=zipfile.ZIP_STORED):
    """A torch>=1.6 zip .pth holding ``{"weight": float32 tensor}`` (``size``, ``stride``, offset 0) over a storage
    that claims ``numel`` elements and holds ``data``: the pickle is written opcode by opcode, as torch.save writes
    it, so no torch is needed."""
    empty_ordered_dict = _global("collections", "OrderedDict") + b")R"
    storage = (b"(" + _ops("storage") + _global("torch", "FloatStorage") + _ops("0") + _ops("cpu") + _ops(numel)
               + b"tQ")  # persistent id -> the storage
    tensor = (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _ops(0) + _ops(tuple(size))
              + _ops(tuple(stride)) + b"\x89" + empty_ordered_dict + b"tR")  # storage, offset, size, stride, ...
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + empty_ordered_dict + _ops("weight") + tensor + b"s.")
        archive.writestr("archive/data/0", data)
    return path


def test_a_hand_written_pth_loads(tmp_path):
    values = np.arange(6, dtype=np.float32)
    path = _write_one_tensor_pth(tmp_path / "ok.pth", (3, 2), (1, 3), 6, values.tobytes())  # a transposed view
    np.testing.assert_array_equal(read_pth_without_torch(path)["weight"], values.reshape(2, 3).T)


@pytest.mark.parametrize("size,stride,numel,data,message", [
    ((2000, 2000), (0, 0), 1, b"\0" * 4, r"tensor weight \(size \(2000, 2000\), stride \(0, 0\), offset 0\) repeats "
                                         r"elements of its storage \(a stride-0 or overlapping view.*contiguous"),
    ((3, 3), (1, 1), 9, b"\0" * 36, r"tensor weight .*repeats elements"),  # overlapping rows
    ((10,), (1,), 4, b"\0" * 16, r"tensor weight .*reads element 9 of a storage of 4 elements.*re-save"),
    ((1000,), (1,), 1000, b"\0" * 4, r"storage '0' \(of tensor weight\) claims 1,000 float32 elements \(4,000 "
                                     r"bytes\) but its zip member archive/data/0 holds 4 bytes.*re-save"),
], ids=["stride 0", "overlapping", "past its storage", "storage short of its claim"])
def test_pth_tensors_must_fit_their_storages(tmp_path, size, stride, numel, data, message):
    path = _write_one_tensor_pth(tmp_path / "lying.pth", size, stride, numel, data)
    for reader in (load_state_dict, read_pth_without_torch):
        with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(path))}: {message}"):
            reader(path)


def test_pth_over_max_bytes_is_refused_before_its_storage_is_read(tmp_path):
    elements = 2**18  # 1 MiB of float32, deflated to about a kilobyte
    path = _write_one_tensor_pth(tmp_path / "bomb.pth", (elements,), (1,), elements, bytes(4 * elements),
                                 zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 4096
    with pytest.raises(ValueError, match=r"its tensors take 1,048,576 bytes together \(largest: weight 1,048,576\), "
                                         r"over max_bytes=1,000,000.*pass a larger max_bytes"):
        read_pth_without_torch(path, max_bytes=10**6)
    assert read_pth_without_torch(path, max_bytes=2**20)["weight"].shape == (elements,)


def _write_npz_member(path, name, header, data):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, buffer.getvalue() + data)
    return path


def test_npz_arrays_are_checked_from_their_headers_before_decompressing(tmp_path):
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, weight=np.zeros(2**18, np.float32))  # 1 MiB, a few kilobytes compressed
    assert bomb.stat().st_size < 8192
    with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(bomb))}: its arrays take 1,048,576 bytes "
                                         r"together \(largest: weight 1,048,576\), over max_bytes=1,000,000"):
        load_state_dict(bomb, max_bytes=10**6)
    assert load_state_dict(bomb, max_bytes=2**20)["weight"].shape == (2**18,)
    lying = _write_npz_member(tmp_path / "lying.npz", "weight.npy",
                              {"descr": "<f4", "fortran_order": False, "shape": (10**9,)}, bytes(16))
    with pytest.raises(ValueError, match=r"array weight claims shape \(1000000000,\) of float32 \(4,000,000,000 "
                                         r"bytes\) but its zip member holds 16 bytes of data.*np\.savez"):
        load_state_dict(lying)
    not_array = tmp_path / "notes.npz"
    with zipfile.ZipFile(not_array, "w") as archive:
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(ValueError, match=r"member 'notes.txt' is not a \.npy array"):
        load_state_dict(not_array)


def test_safetensors_offsets_must_fit_the_file_and_its_size_max_bytes(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file({"weight": np.zeros(1000, np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"its tensors \(the whole file, which they fill\) take .* over "
                                         r"max_bytes=1,000"):
        load_state_dict(path, max_bytes=1000)
    header = b'{"weight":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}'
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(lying))}: .*"):
        load_state_dict(lying)


def test_torch_loaded_tensors_are_counted_before_they_are_copied(tmp_path, monkeypatch):
    class FakeTensor:
        def numel(self):
            return 10**9

        def element_size(self):
            return 8  # float64: 8 GB, over the default 4 GiB

    fake_torch = types.SimpleNamespace(load=lambda *args, **kwargs: {"state_dict": {"weight": FakeTensor()}},
                                       Tensor=FakeTensor)
    monkeypatch.setattr(torchvision, "_torch_or_none", lambda: fake_torch)
    path = tmp_path / "big.pth"
    path.write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"its tensors take 8,000,000,000 bytes together \(largest: "
                                         r"state_dict/weight 8,000,000,000\), over max_bytes"):
        load_state_dict(path)
