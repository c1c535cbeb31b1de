"""ResNet in torchvision's layout: logits and block outputs of imported state dicts equal an independent float64 NumPy
forward (and torchvision's own model where torch is installed); export/import round-trips exactly; train-mode BatchNorm
updates with torchvision's momentum; sown split points have torchvision's names and sizes; parameter counts equal
torchvision's; bad checkpoints fail with one clear error."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.models._resnet import resnet_module_path
from attrjax.models import (ResNet, export_resnet, import_resnet, load_state_dict, resnet18, resnet34, resnet50,
                            resnet_from_state_dict, resnet_layer_names, resnet_small,
                            save_state_dict)

NUM_CLASSES = 5
EPS = 1e-5

# ---------------------------------------------------------------------------------------------------------------
# An independent reference: torchvision's state-dict layout and forward pass, written from the architecture


def _random_state_dict(seed, *, bottleneck=False, stage_sizes=(2, 2, 2, 2), width=4, stem_kernel=7,
                       num_classes=NUM_CLASSES):
    """Random torchvision-layout ResNet state dict (OIHW convs, random BatchNorm statistics), in torchvision's key
    order: stem, then per block conv1, bn1, conv2, bn2[, conv3, bn3][, downsample.0, downsample.1], then fc."""
    rng = np.random.default_rng(seed)
    state_dict = {}

    def conv(name, out_channels, in_channels, size):
        std = np.sqrt(2.0 / (in_channels * size * size))
        state_dict[f"{name}.weight"] = rng.normal(0, std, (out_channels, in_channels, size, size)).astype(np.float32)

    def batch_norm(name, channels):
        state_dict[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        state_dict[f"{name}.bias"] = rng.normal(0, 0.2, channels).astype(np.float32)
        state_dict[f"{name}.running_mean"] = rng.normal(0, 0.2, channels).astype(np.float32)
        state_dict[f"{name}.running_var"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        state_dict[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

    conv("conv1", width, 3, stem_kernel)
    batch_norm("bn1", width)
    expansion = 4 if bottleneck else 1
    channels = width
    for stage, blocks in enumerate(stage_sizes, start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(blocks):
            name = f"layer{stage}.{index}"
            stride = 2 if stage > 1 and index == 0 else 1
            if bottleneck:
                for k, (out_channels, in_channels, size) in enumerate(
                        [(planes, channels, 1), (planes, planes, 3), (4 * planes, planes, 1)], start=1):
                    conv(f"{name}.conv{k}", out_channels, in_channels, size)
                    batch_norm(f"{name}.bn{k}", out_channels)
            else:
                for k, in_channels in enumerate([channels, planes], start=1):
                    conv(f"{name}.conv{k}", planes, in_channels, 3)
                    batch_norm(f"{name}.bn{k}", planes)
            if stride != 1 or channels != planes * expansion:
                conv(f"{name}.downsample.0", planes * expansion, channels, 1)
                batch_norm(f"{name}.downsample.1", planes * expansion)
            channels = planes * expansion
    state_dict["fc.weight"] = rng.normal(0, 1 / np.sqrt(channels), (num_classes, channels)).astype(np.float32)
    state_dict["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return state_dict


def _conv(x, weight, stride, padding):
    """NCHW x OIHW cross-correlation with zero padding, one einsum per kernel offset."""
    batch, _, height, width = x.shape
    out_channels, _, size, _ = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_height, out_width = (height + 2 * padding - size) // stride + 1, (width + 2 * padding - size) // stride + 1
    out = np.zeros((batch, out_channels, out_height, out_width))
    for dy in range(size):
        for dx in range(size):
            window = padded[:, :, dy:dy + stride * (out_height - 1) + 1:stride,
                            dx:dx + stride * (out_width - 1) + 1:stride]
            out += np.einsum("bchw,oc->bohw", window, weight[:, :, dy, dx])
    return out


def _batch_norm(x, sd, name):
    """Eval-mode BatchNorm over the channel axis of NCHW."""
    mean, var, gamma, beta = (sd[f"{name}.{leaf}"][None, :, None, None]
                              for leaf in ("running_mean", "running_var", "weight", "bias"))
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def _max_pool_3x3_stride2_pad1(x):
    """Each output pixel is the maximum of its 3x3 window over the -inf-padded map, one window at a time."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    out_height, out_width = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
    out = np.empty(x.shape[:2] + (out_height, out_width))
    for y in range(out_height):
        for x_ in range(out_width):
            out[:, :, y, x_] = padded[:, :, 2 * y:2 * y + 3, 2 * x_:2 * x_ + 3].max(axis=(2, 3))
    return out


def _relu(x):
    return np.maximum(x, 0.0)


def _block(x, sd, name, stride):
    if f"{name}.conv3.weight" in sd:  # bottleneck: the stride sits on the 3x3 conv
        y = _relu(_batch_norm(_conv(x, sd[f"{name}.conv1.weight"], 1, 0), sd, f"{name}.bn1"))
        y = _relu(_batch_norm(_conv(y, sd[f"{name}.conv2.weight"], stride, 1), sd, f"{name}.bn2"))
        y = _batch_norm(_conv(y, sd[f"{name}.conv3.weight"], 1, 0), sd, f"{name}.bn3")
    else:
        y = _relu(_batch_norm(_conv(x, sd[f"{name}.conv1.weight"], stride, 1), sd, f"{name}.bn1"))
        y = _batch_norm(_conv(y, sd[f"{name}.conv2.weight"], 1, 1), sd, f"{name}.bn2")
    if f"{name}.downsample.0.weight" in sd:
        x = _batch_norm(_conv(x, sd[f"{name}.downsample.0.weight"], stride, 0), sd, f"{name}.downsample.1")
    return _relu(y + x)


def _numpy_forward(state_dict, images_nchw):
    """float64 forward from the PyTorch-layout arrays -> (logits (B,K), {split point: NCHW activation})."""
    sd = {key: value.astype(np.float64) for key, value in state_dict.items()}
    stem_kernel = sd["conv1.weight"].shape[-1]
    x = _conv(images_nchw.astype(np.float64), sd["conv1.weight"], 2 if stem_kernel == 7 else 1, stem_kernel // 2)
    x = _relu(_batch_norm(x, sd, "bn1"))
    if stem_kernel == 7:
        x = _max_pool_3x3_stride2_pad1(x)
    activations = {"stem": x}
    stage = 1
    while f"layer{stage}.0.conv1.weight" in sd:
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in sd:
            name = f"layer{stage}.{index}"
            x = _block(x, sd, name, 2 if stage > 1 and index == 0 else 1)
            activations[name] = x
            index += 1
        stage += 1
    return x.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"], activations


# ---------------------------------------------------------------------------------------------------------------
# Fixtures

LAYOUTS = {  # name -> (model, options of its random state dict, image side)
    "resnet18_basic": (lambda: resnet18(NUM_CLASSES, width_divisor=16), {}, 32),
    "resnet50_bottleneck": (lambda: resnet50(NUM_CLASSES, width_divisor=16),
                            {"bottleneck": True, "stage_sizes": (3, 4, 6, 3)}, 33),  # odd sides: maps round down
    "small_stem": (lambda: resnet_small(NUM_CLASSES, width_divisor=4),
                   {"stage_sizes": (1, 1, 1, 1), "stem_kernel": 3}, 16),
}


def _images_nchw(side, seed=1, batch=2):
    return np.random.default_rng(seed).normal(size=(batch, 3, side, side)).astype(np.float32)


def _nhwc(images_nchw):
    return jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def basic():
    """(model, state dict, variables) of a resnet18 at width 4."""
    model = resnet18(NUM_CLASSES, width_divisor=16)
    state_dict = _random_state_dict(0)
    return model, state_dict, import_resnet(state_dict, model)


# ---------------------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_imported_logits_and_block_outputs_equal_an_independent_numpy_forward(layout):
    make_model, options, side = LAYOUTS[layout]
    model = make_model()
    state_dict = _random_state_dict(0, **options)
    variables = import_resnet(state_dict, model)
    images = _images_nchw(side)
    logits, state = model.apply(variables, _nhwc(images), mutable=["intermediates"])
    expected_logits, expected_activations = _numpy_forward(state_dict, images)
    chex.assert_trees_all_close(np.asarray(logits), expected_logits, rtol=1e-4, atol=1e-4)
    sown = state["intermediates"]
    assert list(sown) == list(expected_activations) == list(resnet_layer_names(model))
    for name, expected in expected_activations.items():
        chex.assert_trees_all_close(np.asarray(sown[name][0]), np.transpose(expected, (0, 2, 3, 1)),
                                    rtol=1e-4, atol=1e-4, custom_message=name)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imported_logits_equal_torchvisions_own_model(name):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(num_classes=7).eval()
    with torch.no_grad():  # fresh BatchNorms are the identity: give them statistics so that they matter
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    state_dict = {key: value.numpy() for key, value in reference.state_dict().items()}
    model = {"resnet18": resnet18, "resnet50": resnet50}[name](7)
    variables = import_resnet(state_dict, model)
    images = _images_nchw(64, batch=1)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    chex.assert_trees_all_close(np.asarray(model.apply(variables, _nhwc(images))), expected, rtol=1e-4, atol=1e-4)
    reference.load_state_dict({key: torch.from_numpy(value) for key, value in export_resnet(variables, model).items()},
                              strict=True)


# ---------------------------------------------------------------------------------------------------------------
# State dicts


def test_export_then_import_round_trips_exactly_in_torchvision_key_order(basic):
    model, state_dict, variables = basic
    exported = export_resnet(variables, model)
    assert list(exported) == list(state_dict)  # torchvision's order, num_batches_tracked included
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            assert exported[key].dtype == np.int64 and exported[key].shape == ()
        else:
            assert exported[key].dtype == np.float32
            np.testing.assert_array_equal(exported[key], value, err_msg=key)
    chex.assert_trees_all_equal(import_resnet(exported, model), variables)


def test_files_data_parallel_prefix_and_model_inference(basic, tmp_path):
    model, state_dict, variables = basic
    save_state_dict(state_dict, tmp_path / "resnet.safetensors")
    chex.assert_trees_all_equal(import_resnet(load_state_dict(tmp_path / "resnet.safetensors"), model), variables)
    prefixed = {f"module.{key}": value for key, value in state_dict.items()}
    chex.assert_trees_all_equal(import_resnet(prefixed, model), variables)
    assert resnet_from_state_dict(prefixed) == model
    for layout, (make_model, options, _) in LAYOUTS.items():
        assert resnet_from_state_dict(_random_state_dict(0, **options)) == make_model(), layout


def test_imagenet_head_is_dropped_for_a_new_head(basic):
    model, state_dict, variables = basic
    imagenet = {**state_dict, "fc.weight": np.ones((1000, 32), np.float32), "fc.bias": np.ones(1000, np.float32)}
    with pytest.raises(ValueError, match=r"(?s)fc\.weight is \(1000, 32\).*num_classes=1000.*new_head_variables"):
        import_resnet(imagenet, model)
    rng = np.random.default_rng(5)
    new_head = {"params": {"fc": {"kernel": rng.normal(size=(32, NUM_CLASSES)), "bias": rng.normal(size=NUM_CLASSES)}}}
    imported = import_resnet(imagenet, model, new_head_variables=new_head)
    chex.assert_trees_all_close(imported["params"]["fc"], jax.tree.map(np.float32, new_head["params"]["fc"]))
    chex.assert_trees_all_equal({**imported["params"], "fc": None}, {**variables["params"], "fc": None})
    chex.assert_trees_all_equal(imported["batch_stats"], variables["batch_stats"])
    bad_head = {"params": {"fc": {"kernel": np.zeros((32, 1000)), "bias": np.zeros(1000)}}}
    with pytest.raises(ValueError, match=r"params/fc/kernel should have shape \(32, 5\)"):
        import_resnet(imagenet, model, new_head_variables=bad_head)


def test_block_type_mismatch_is_one_error_with_a_hint(basic):
    model, _, _ = basic
    bottleneck = _random_state_dict(0, bottleneck=True, stage_sizes=(2, 2, 2, 2))
    with pytest.raises(ValueError) as error:
        import_resnet(bottleneck, model)
    message = str(error.value)
    assert message.startswith("cannot import this state dict into ResNet(block='basic'")
    assert "unexpected keys" in message and "layer1.0.conv3.weight" in message
    assert "the checkpoint has bottleneck blocks, the model basic blocks" in message and "block='bottleneck'" in message
    assert "resnet_from_state_dict(state_dict)" in message


def test_missing_unexpected_misshapen_and_integer_entries_are_listed(basic):
    model, state_dict, _ = basic
    broken = dict(state_dict)
    del broken["layer2.0.downsample.1.running_var"]
    broken["layer1.0.extra.weight"] = np.zeros(3, np.float32)
    broken["layer1.1.conv2.weight"] = np.zeros((4, 4, 5, 5), np.float32)
    broken["fc.bias"] = np.zeros(NUM_CLASSES, np.int64)
    with pytest.raises(ValueError) as error:
        import_resnet(broken, model)
    message = str(error.value)
    assert "missing keys (1): layer2.0.downsample.1.running_var" in message
    assert "unexpected keys (1): layer1.0.extra.weight" in message
    assert "wrong shape: layer1.1.conv2.weight is (4, 4, 5, 5) in the checkpoint, the model expects (4, 4, 3, 3)" \
        in message
    assert "not floating point (1): fc.bias (int64)" in message


@pytest.mark.parametrize("options, hint", [
    ({"width": 8}, "conv1 has 8 filters, the model's width is 4: build it with width=8"),
    ({"stem_kernel": 3}, "conv1 is the 'small' stem, the model has stem='imagenet'"),
    ({"stage_sizes": (3, 4, 6, 3)}, "the checkpoint has (3, 4, 6, 3) blocks per stage, the model (2, 2, 2, 2)"),
    ({"num_classes": 1000}, "the checkpoint's fc predicts 1000 classes, the model 5"),
])
def test_architecture_mismatches_name_what_differs(basic, options, hint):
    model, _, _ = basic
    with pytest.raises(ValueError, match="cannot import") as error:
        import_resnet(_random_state_dict(0, **options), model)
    assert hint in str(error.value)


def test_not_a_resnet_and_bad_variables_fail_clearly(basic):
    model, state_dict, variables = basic
    with pytest.raises(ValueError, match=r"(?s)missing keys.*not a torchvision ResNet state dict: conv1\.weight"):
        import_resnet({"features.0.weight": np.zeros((4, 3, 3, 3), np.float32)}, model)
    without_head = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    with pytest.raises(ValueError, match="no fc.weight to read num_classes from: pass num_classes"):
        resnet_from_state_dict(without_head)
    assert resnet_from_state_dict(without_head, num_classes=NUM_CLASSES) == model
    params = {module: leaves for module, leaves in variables["params"].items() if module != "fc"}
    with pytest.raises(ValueError, match=r"params/fc/kernel: missing, the model expects \(32, 5\)"):
        export_resnet({**variables, "params": params}, model)


# ---------------------------------------------------------------------------------------------------------------
# The module


def test_train_mode_batch_norm_updates_batch_stats_with_torchvisions_momentum():
    model = resnet_small(NUM_CLASSES, width_divisor=4)
    variables = import_resnet(_random_state_dict(0, stage_sizes=(1, 1, 1, 1), stem_kernel=3), model)
    images = _nhwc(_images_nchw(16, batch=4))
    _, state = model.apply(variables, images, train=True, mutable=["batch_stats"], capture_intermediates=True)
    old, new = variables["batch_stats"], state["batch_stats"]
    assert jax.tree.structure(new) == jax.tree.structure(old)
    for (path, before), after in zip(jax.tree.leaves_with_path(old), jax.tree.leaves(new)):
        assert not np.allclose(before, after), f"{jax.tree_util.keystr(path)} was not updated"
    conv1 = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    batch_mean, batch_var = conv1.mean(axis=(0, 1, 2)), conv1.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new["bn1"]["mean"], 0.9 * np.asarray(old["bn1"]["mean"]) + 0.1 * batch_mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["bn1"]["var"], 0.9 * np.asarray(old["bn1"]["var"]) + 0.1 * batch_var,
                               rtol=1e-5, atol=1e-6)


def test_every_block_is_a_submodule_at_the_documented_path(basic):
    model, _, variables = basic
    images = _nhwc(_images_nchw(32))
    _, state = model.apply(variables, images, capture_intermediates=True)
    captured = state["intermediates"]
    for name in resnet_layer_names(model)[1:]:
        (module,) = resnet_module_path(name)
        np.testing.assert_array_equal(captured[module]["__call__"][0], captured[name][0], err_msg=name)
    assert resnet_module_path("layer4.1") == ("layer4_1",)
    assert resnet_module_path("layer2.0.downsample.1") == ("layer2_0", "downsample_1")
    assert "downsample_1" in variables["batch_stats"]["layer2_0"] and "downsample_0" in variables["params"]["layer2_0"]
    assert resnet_module_path("conv1") == ("conv1",)
    with pytest.raises(ValueError, match="no single module"):
        resnet_module_path("stem")


def _sown_shapes(model, side):
    """{split point: (H, W, C)} of ``model`` on (1, side, side, 3) images, without computing anything."""
    images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, images)
    return {name: value[0].shape[1:] for name, value in state["intermediates"].items()}


def _expected_shapes(stage_sizes, stem, sides, channels):
    shapes = {"stem": (sides[0], sides[0], stem)}
    for stage, (blocks, side, width) in enumerate(zip(stage_sizes, sides, channels), start=1):
        shapes.update({f"layer{stage}.{j}": (side, side, width) for j in range(blocks)})
    return shapes


@pytest.mark.parametrize("model, side, expected", [
    (resnet18(1000), 224, _expected_shapes((2, 2, 2, 2), 64, (56, 28, 14, 7), (64, 128, 256, 512))),
    (resnet50(1000), 224, _expected_shapes((3, 4, 6, 3), 64, (56, 28, 14, 7), (256, 512, 1024, 2048))),
    (resnet_small(20), 64, _expected_shapes((1, 1, 1, 1), 16, (64, 32, 16, 8), (16, 32, 64, 128))),
    (resnet18(20, width_divisor=4, stem="small"), 64, _expected_shapes((2, 2, 2, 2), 16, (64, 32, 16, 8),
                                                                        (16, 32, 64, 128))),
], ids=["resnet18_224px", "resnet50_224px", "resnet_small_64px", "resnet18_x4_small_stem_64px"])
def test_sown_split_points_have_torchvision_names_and_sizes(model, side, expected):
    assert resnet_layer_names(model) == tuple(expected)  # forward order (eval_shape returns the names sorted)
    assert _sown_shapes(model, side) == expected


@pytest.mark.parametrize("make_model, count", [(resnet18, 11_689_512), (resnet34, 21_797_672),
                                               (resnet50, 25_557_032)])
def test_parameter_counts_equal_torchvisions(make_model, count):
    model = make_model(1000)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == count


def test_dtype_sets_the_computation_not_the_parameters():
    model = resnet18(NUM_CLASSES, width_divisor=16, dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(model.apply, variables, images).dtype == jnp.bfloat16


@pytest.mark.parametrize("model, message", [
    (ResNet(block="wide", stage_sizes=(2, 2), num_classes=3), "block must be one of"),
    (ResNet(block="basic", stage_sizes=(2, 2), num_classes=3, stem="cifar"), "stem must be one of"),
    (ResNet(block="basic", stage_sizes=(2, 0), num_classes=3), "stage_sizes must be one or more positive"),
])
def test_bad_configurations_are_refused(model, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_bad_width_divisor_and_images_are_refused():
    with pytest.raises(ValueError, match="width_divisor must be a positive integer, got 0"):
        resnet18(NUM_CLASSES, width_divisor=0)
    model = resnet_small(NUM_CLASSES)
    with pytest.raises(ValueError, match=r"NHWC layout, got shape \(32, 32, 3\); add a batch axis"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((32, 32, 3))))
