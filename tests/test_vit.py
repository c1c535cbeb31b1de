"""Vision Transformer: logits of checkpoints written in each pretrained layout (timm and torchvision .pth files,
Hugging Face .safetensors, big_vision .npz) and imported equal an independent float64 NumPy forward written from
the paper's equations; mismatched checkpoints fail naming the first tensor that does not fit and the sizes they
hold; the blocks are submodules that output tokens; the standard sizes have the reference parameter counts; the
linen module trains."""

import pickle
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from attrjax.models import load_state_dict, save_state_dict
from attrjax.models._vit import ViT, vit_b16, vit_layer_names, vit_s16, vit_small, vit_ti16
from attrjax.models._vit_import import VIT_LAYOUTS, detect_vit_layout, import_vit

IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP, CLASSES = 32, 8, 16, 2, 2, 32, 5
QKV = ("query", "key", "value")


def _model(**changes):
    sizes = dict(num_classes=CLASSES, image_size=IMAGE, patch=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                 mlp_dim=MLP)
    return ViT(**{**sizes, **changes})


def _initial_shapes(model):
    """``model.init``'s variables as shapes (nothing is computed)."""
    images = jnp.zeros((1, model.image_size, model.image_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images))


def _images(seed=0, batch=2, size=IMAGE):
    return np.random.default_rng(seed).normal(0, 1, (batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# An independent reference: random weights in the paper's notation (x @ W + b) and a float64 forward from them


def _random_weights(seed, *, width=WIDTH, depth=DEPTH, mlp=MLP, image=IMAGE, class_token=True, classes=CLASSES):
    """Weights as the equations use them: patches (p,p,3,D) applied to a patch flattened in (row, column, channel)
    order, position (T,D) for the tokens in order (class token first), linear maps (in, out)."""
    rng = np.random.default_rng(seed)

    def linear(inputs, outputs):
        return rng.normal(0, inputs ** -0.5, (inputs, outputs)), rng.normal(0, 0.1, outputs)

    def norm():
        return rng.uniform(0.5, 1.5, width), rng.normal(0, 0.1, width)

    tokens = (image // PATCH) ** 2 + class_token
    weights = {"patches": rng.normal(0, (3 * PATCH * PATCH) ** -0.5, (PATCH, PATCH, 3, width)),
               "patches_bias": rng.normal(0, 0.1, width), "position": rng.normal(0, 0.5, (tokens, width)),
               "norm": norm(), "head": linear(width, classes),
               "blocks": [{"norm1": norm(), **{name: linear(width, width) for name in QKV + ("out",)},
                           "norm2": norm(), "fc1": linear(width, mlp), "fc2": linear(mlp, width)}
                          for _ in range(depth)]}
    if class_token:
        weights["cls"] = rng.normal(0, 0.5, width)
    return weights


def _layer_norm(x, scale_bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * scale_bias[0] + scale_bias[1]


def _gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _reference_logits(weights, images, *, heads=HEADS, approximate_gelu=False, eps=1e-6):
    """float64 ViT forward: patches -> [class token] -> + position -> pre-LN blocks -> LN -> pool -> head."""
    images = np.asarray(images, np.float64)
    batch, size = images.shape[:2]
    grid, width = size // PATCH, weights["patches"].shape[-1]
    patches = images.reshape(batch, grid, PATCH, grid, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(batch, grid * grid, -1) @ weights["patches"].reshape(-1, width) + weights["patches_bias"]
    if "cls" in weights:
        x = np.concatenate([np.broadcast_to(weights["cls"], (batch, 1, width)), x], axis=1)
    x = x + weights["position"]
    for block in weights["blocks"]:
        y = _layer_norm(x, block["norm1"], eps)
        q, k, v = ((y @ block[name][0] + block[name][1]).reshape(batch, -1, heads, width // heads) for name in QKV)
        logits = np.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(width // heads)
        attention = np.exp(logits - logits.max(-1, keepdims=True))
        attention /= attention.sum(-1, keepdims=True)
        mixed = np.einsum("bhqk,bkhc->bqhc", attention, v).reshape(batch, -1, width)
        x = x + mixed @ block["out"][0] + block["out"][1]
        y = _layer_norm(x, block["norm2"], eps)
        x = x + _gelu(y @ block["fc1"][0] + block["fc1"][1], approximate_gelu) @ block["fc2"][0] + block["fc2"][1]
    x = _layer_norm(x, weights["norm"], eps)
    pooled = x[:, 0] if "cls" in weights else x.mean(axis=1)
    return pooled @ weights["head"][0] + weights["head"][1]


# ---------------------------------------------------------------------------------------------------------------
# The reference weights written in each layout, as each project's model names and shapes its tensors


def _torch_linear(state_dict, module, weight_bias, *, fused_suffix=False):
    """A PyTorch Linear: weight (out, in), bias (out,)."""
    weight, bias = weight_bias
    state_dict[module + ("weight" if fused_suffix else ".weight")] = weight.T
    state_dict[module + ("bias" if fused_suffix else ".bias")] = bias


def _torch_norm(state_dict, module, scale_bias):
    state_dict[f"{module}.weight"], state_dict[f"{module}.bias"] = scale_bias


def _stacked_qkv(block):
    """(3D, D) weight and (3D,) bias: query, key, value rows stacked, as timm's qkv and torchvision's in_proj."""
    return (np.concatenate([block[name][0] for name in QKV], axis=1),
            np.concatenate([block[name][1] for name in QKV]))


def _timm_state_dict(weights):
    sd = {"patch_embed.proj.weight": weights["patches"].transpose(3, 2, 0, 1),
          "patch_embed.proj.bias": weights["patches_bias"]}
    if "cls" in weights:
        sd["cls_token"] = weights["cls"][None, None]
    sd["pos_embed"] = weights["position"][None]
    for index, block in enumerate(weights["blocks"]):
        prefix = f"blocks.{index}."
        _torch_norm(sd, prefix + "norm1", block["norm1"])
        _torch_linear(sd, prefix + "attn.qkv", _stacked_qkv(block))
        _torch_linear(sd, prefix + "attn.proj", block["out"])
        _torch_norm(sd, prefix + "norm2", block["norm2"])
        _torch_linear(sd, prefix + "mlp.fc1", block["fc1"])
        _torch_linear(sd, prefix + "mlp.fc2", block["fc2"])
    _torch_norm(sd, "norm", weights["norm"])
    _torch_linear(sd, "head", weights["head"])
    return sd


def _torchvision_state_dict(weights, *, legacy_mlp_names=False):
    sd = {"class_token": weights["cls"][None, None], "conv_proj.weight": weights["patches"].transpose(3, 2, 0, 1),
          "conv_proj.bias": weights["patches_bias"], "encoder.pos_embedding": weights["position"][None]}
    fc1, fc2 = ("mlp.linear_1", "mlp.linear_2") if legacy_mlp_names else ("mlp.0", "mlp.3")
    for index, block in enumerate(weights["blocks"]):
        prefix = f"encoder.layers.encoder_layer_{index}."
        _torch_norm(sd, prefix + "ln_1", block["norm1"])
        _torch_linear(sd, prefix + "self_attention.in_proj_", _stacked_qkv(block), fused_suffix=True)
        _torch_linear(sd, prefix + "self_attention.out_proj", block["out"])
        _torch_norm(sd, prefix + "ln_2", block["norm2"])
        _torch_linear(sd, prefix + fc1, block["fc1"])
        _torch_linear(sd, prefix + fc2, block["fc2"])
    _torch_norm(sd, "encoder.ln", weights["norm"])
    _torch_linear(sd, "heads.head", weights["head"])
    return sd


def _hf_state_dict(weights):
    sd = {"vit.embeddings.cls_token": weights["cls"][None, None],
          "vit.embeddings.position_embeddings": weights["position"][None],
          "vit.embeddings.patch_embeddings.projection.weight": weights["patches"].transpose(3, 2, 0, 1),
          "vit.embeddings.patch_embeddings.projection.bias": weights["patches_bias"]}
    for index, block in enumerate(weights["blocks"]):
        prefix = f"vit.encoder.layer.{index}."
        _torch_norm(sd, prefix + "layernorm_before", block["norm1"])
        for name in QKV:
            _torch_linear(sd, prefix + f"attention.attention.{name}", block[name])
        _torch_linear(sd, prefix + "attention.output.dense", block["out"])
        _torch_norm(sd, prefix + "layernorm_after", block["norm2"])
        _torch_linear(sd, prefix + "intermediate.dense", block["fc1"])
        _torch_linear(sd, prefix + "output.dense", block["fc2"])
    _torch_norm(sd, "vit.layernorm", weights["norm"])
    _torch_linear(sd, "classifier", weights["head"])
    return sd


def _big_vision_state_dict(weights, *, flavour="big_vision", heads=HEADS):
    """Flax parameter trees flattened with "/". ``"big_vision"``: the current code (``params/`` prefix, position
    embedding added before the class token is prepended); ``"original"``: the first ViT release (no prefix,
    ``posembed_input``, module indices 1/2/3 in a block); ``"scanned"``: big_vision with the blocks stacked."""
    width = weights["patches"].shape[-1]
    original = flavour == "original"
    sd = {"embedding/kernel": weights["patches"], "embedding/bias": weights["patches_bias"]}
    position = weights["position"]
    if "cls" in weights and not original:  # big_vision: the class token has no position embedding of its own
        sd["cls"], position = (weights["cls"] + position[0])[None, None], position[1:]
    elif "cls" in weights:
        sd["cls"] = weights["cls"][None, None]
    sd["Transformer/posembed_input/pos_embedding" if original else "pos_embedding"] = position[None]
    attention, norm2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if original else
                             ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    blocks = []
    for block in weights["blocks"]:
        tree = {"LayerNorm_0/scale": block["norm1"][0], "LayerNorm_0/bias": block["norm1"][1],
                f"{norm2}/scale": block["norm2"][0], f"{norm2}/bias": block["norm2"][1],
                f"{attention}/out/kernel": block["out"][0].reshape(heads, -1, width),
                f"{attention}/out/bias": block["out"][1],
                f"{mlp}/Dense_0/kernel": block["fc1"][0], f"{mlp}/Dense_0/bias": block["fc1"][1],
                f"{mlp}/Dense_1/kernel": block["fc2"][0], f"{mlp}/Dense_1/bias": block["fc2"][1]}
        for name in QKV:
            tree[f"{attention}/{name}/kernel"] = block[name][0].reshape(width, heads, -1)
            tree[f"{attention}/{name}/bias"] = block[name][1].reshape(heads, -1)
        blocks.append(tree)
    if flavour == "scanned":
        sd.update({f"Transformer/encoderblock/{key}": np.stack([tree[key] for tree in blocks]) for key in blocks[0]})
    else:
        sd.update({f"Transformer/encoderblock_{index}/{key}": value for index, tree in enumerate(blocks)
                   for key, value in tree.items()})
    sd.update({"Transformer/encoder_norm/scale": weights["norm"][0],
               "Transformer/encoder_norm/bias": weights["norm"][1],
               "head/kernel": weights["head"][0], "head/bias": weights["head"][1]})
    prefix = "" if original else "params/"
    return {prefix + key: np.asarray(value, np.float32) for key, value in sd.items()}


def _write_pth(state_dict, path):
    """A torch>=1.6 zip ``.pth`` of float32 tensors, one storage each, with the pickle written opcode by opcode as
    ``torch.save`` writes it: no torch is needed to make it, and ``load_state_dict`` reads it as PyTorch files."""

    def push(value):  # the opcodes that push an int, str or tuple: a protocol-2 pickle minus PROTO and STOP
        return pickle.dumps(value, protocol=2)[2:-1]

    def global_(module, name):
        return f"c{module}\n{name}\n".encode()

    ordered_dict = global_("collections", "OrderedDict") + b")R"
    items, storages = b"", {}
    for index, (key, value) in enumerate(state_dict.items()):
        value = np.ascontiguousarray(value, np.float32)
        storage = (b"(" + push("storage") + global_("torch", "FloatStorage") + push(str(index)) + push("cpu")
                   + push(value.size) + b"tQ")  # a persistent id: the storage
        strides = tuple(stride // value.itemsize for stride in value.strides)
        items += push(key) + (global_("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + push(0)
                              + push(value.shape) + push(strides) + b"\x89" + ordered_dict + b"tR")
        storages[f"archive/data/{index}"] = value.tobytes()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + ordered_dict + b"(" + items + b"u.")
        for name, data in storages.items():
            archive.writestr(name, data)
    return path


def _write(state_dict, path):
    if path.suffix == ".pth":
        return _write_pth(state_dict, path)
    save_state_dict({key: np.asarray(value, np.float32) for key, value in state_dict.items()}, path)
    return path


# layout, how the reference weights are written, the file, model changes
CASES = {
    "timm": ("timm", _timm_state_dict, "model.pth", {}),
    "timm-gap": ("timm", _timm_state_dict, "model.pth", {"pool": "gap"}),
    "torchvision": ("torchvision", _torchvision_state_dict, "vit.pth", {}),
    "torchvision-legacy-mlp-names": ("torchvision", lambda w: _torchvision_state_dict(w, legacy_mlp_names=True),
                                "vit.pth", {}),
    "hf": ("hf", _hf_state_dict, "model.safetensors", {"layer_norm_eps": 1e-12}),
    "big_vision": ("big_vision", _big_vision_state_dict, "vit.npz", {"approximate_gelu": True}),
    "big_vision-gap": ("big_vision", _big_vision_state_dict, "vit.npz", {"approximate_gelu": True, "pool": "gap"}),
    "big_vision-scanned": ("big_vision", lambda w: _big_vision_state_dict(w, flavour="scanned"), "vit.npz",
                           {"approximate_gelu": True}),
    "original-vit-release": ("big_vision", lambda w: _big_vision_state_dict(w, flavour="original"), "vit.npz",
                             {"approximate_gelu": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_imported_checkpoints_compute_the_reference_logits(tmp_path, case):
    layout, write, file_name, changes = CASES[case]
    model = _model(**changes)
    weights = _random_weights(1, class_token=model.pool == "token")
    state_dict = load_state_dict(_write(write(weights), tmp_path / file_name))
    assert detect_vit_layout(state_dict) == layout
    variables = import_vit(state_dict, model)  # the layout told from the keys
    chex.assert_trees_all_equal_shapes(variables, _initial_shapes(model))

    images = _images()
    logits = model.apply(variables, images)
    expected = _reference_logits(weights, images, approximate_gelu=model.approximate_gelu, eps=model.layer_norm_eps)
    chex.assert_shape(logits, (2, CLASSES))
    chex.assert_trees_all_close(np.asarray(logits, np.float64), expected, rtol=1e-5,
                                atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints that do not fit are refused, naming what does not fit and the ViT they hold


def test_a_checkpoint_of_another_width_names_the_first_tensor_that_does_not_fit():
    state_dict = _timm_state_dict(_random_weights(0, width=24))
    with pytest.raises(ValueError) as error:
        import_vit(state_dict, _model())
    message = str(error.value)
    first_wrong = next(line for line in message.splitlines() if "wrong shape" in line)
    assert first_wrong.strip() == ("wrong shape: patch_embed.proj.weight is (24, 3, 8, 8) in the checkpoint, the model "
                                   "expects (16, 3, 8, 8)")
    assert "(timm layout)" in message
    assert "the checkpoint holds a ViT with width=24, patch=8, depth=2, mlp_dim=32, num_classes=5" in message
    assert "the model differs in width=16" in message


def test_a_checkpoint_of_another_depth_lists_the_blocks_the_model_lacks():
    state_dict = _hf_state_dict(_random_weights(0, depth=3))
    with pytest.raises(ValueError, match=r"(?s)unexpected keys \(16\): vit\.encoder\.layer\.2\.layernorm_before\.weight"
                                         r".*depth=3.*the model differs in depth=2"):
        import_vit(state_dict, _model(), layout="hf")


def test_a_missing_tensor_is_named():
    state_dict = _torchvision_state_dict(_random_weights(0))
    del state_dict["encoder.layers.encoder_layer_1.self_attention.in_proj_bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder\.layers\.encoder_layer_1\.self_attention\."
                                         r"in_proj_bias$"):
        import_vit(state_dict, _model())


def test_position_embeddings_of_another_grid_are_refused_with_the_image_size_they_fit():
    state_dict = _big_vision_state_dict(_random_weights(0, image=48))  # a 6x6 grid
    with pytest.raises(ValueError, match=r"(?s)wrong shape: pos_embedding is \(1, 37, 16\) in the checkpoint, the "
                                         r"model expects \(1, 17, 16\).*image_size=48.*not resampled"):
        import_vit(state_dict, _model(approximate_gelu=True))


def test_pooling_that_differs_is_named():
    state_dict = _timm_state_dict(_random_weights(0, class_token=False))
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\): cls_token.*pool='gap'.*differs in pool='token'"):
        import_vit(state_dict, _model())


def test_unknown_and_undetectable_layouts_are_refused_with_the_layouts_there_are():
    state_dict = _timm_state_dict(_random_weights(0))
    with pytest.raises(ValueError, match=r"unknown ViT layout 'keras': use one of timm, torchvision, hf, big_vision"):
        import_vit(state_dict, _model(), layout="keras")
    with pytest.raises(ValueError, match=r"cannot tell which ViT layout.*timm: patch_embed\.proj\.weight; "
                                         r"torchvision: conv_proj\.weight; hf: .*big_vision: params/embedding/kernel"):
        import_vit({"features.0.weight": np.zeros((4, 3, 3, 3), np.float32)}, _model())
    assert VIT_LAYOUTS == ("timm", "torchvision", "hf", "big_vision")


def test_integer_tensors_are_refused_not_cast():
    state_dict = _big_vision_state_dict(_random_weights(0))
    state_dict["params/head/kernel"] = state_dict["params/head/kernel"].astype(np.int32)
    with pytest.raises(ValueError, match=r"integer or bool tensors .*: head/kernel \(int32\)"):
        import_vit(state_dict, _model(approximate_gelu=True))


def test_a_new_head_replaces_the_checkpoints():
    state_dict = _timm_state_dict(_random_weights(0, classes=1000))  # an ImageNet head
    model = _model()
    fresh = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), _initial_shapes(model))
    with pytest.raises(ValueError, match=r"(?s)wrong shape: head\.weight is \(1000, 16\).*new_head_variables"):
        import_vit(state_dict, model)
    variables = import_vit(state_dict, model, new_head_variables=fresh)
    chex.assert_trees_all_equal(variables["params"]["head"], fresh["params"]["head"])
    np.testing.assert_array_equal(variables["params"]["norm"]["scale"], state_dict["norm.weight"].astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# The module: split points, standard sizes, configuration errors, training


def test_the_embedding_and_every_block_are_submodules_that_output_tokens():
    model = _model(depth=3)
    _, state = jax.eval_shape(lambda variables, images: model.apply(
        variables, images, capture_intermediates=True, mutable=["intermediates"]), _initial_shapes(model), _images())
    outputs = {name: state["intermediates"][name]["__call__"] for name in vit_layer_names(model)}
    assert tuple(outputs) == ("embedding", "block0", "block1", "block2")
    for output in outputs.values():
        assert isinstance(output, tuple) and len(output) == 1  # one array, not a tuple of them
        chex.assert_shape(output[0], (2, model.num_tokens, WIDTH))
    assert model.num_tokens == (IMAGE // PATCH) ** 2 + 1


def _parameter_count(model):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_initial_shapes(model)))


def test_standard_sizes_have_the_reference_parameter_counts():
    assert _parameter_count(vit_b16(1000)) == 86_567_656  # torchvision's vit_b_16
    assert _parameter_count(vit_s16(1000)) == 22_050_664  # timm's vit_small_patch16_224
    assert _parameter_count(vit_ti16(1000)) == 5_717_416  # timm's vit_tiny_patch16_224
    small = vit_small(10)
    assert (small.image_size, small.grid_size, small.num_tokens, small.pool) == (64, 8, 64, "gap")


@pytest.mark.parametrize("changes,message", [
    ({"pool": "cls"}, r"pool must be one of \('token', 'gap'\), got 'cls'"),
    ({"num_heads": 3}, r"width=16 is not a multiple of num_heads=3"),
    ({"image_size": 36}, r"image_size=36 is not a multiple of patch=8"),
    ({"depth": 0}, r"sizes must be positive integers, got depth=0"),
])
def test_inconsistent_configurations_are_refused(changes, message):
    model = _model(**changes)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros((1, model.image_size, model.image_size, 3)))


def test_images_of_another_size_are_refused():
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 32, 32, 3\).*got shape \(1, 3, 32, 32\)"):
        _model().init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def test_the_linen_vit_trains():
    model = _model(depth=1, pool="gap", dropout=0.1)
    images = jnp.asarray(_images(batch=8))
    labels = jnp.arange(8) % CLASSES
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
    optimizer = optax.adam(3e-3)

    def loss_fn(params, key):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for key in jax.random.split(jax.random.key(1), 10):
        params, opt_state, loss = step(params, opt_state, key)
        losses.append(float(loss))
    chex.assert_tree_all_finite(params)
    assert losses[-1] < 0.5 * losses[0], losses
