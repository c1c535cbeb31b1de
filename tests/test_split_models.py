"""Split models: a user's own linen CNN (no attrjax methods) and the VGG behave alike under the protocol."""

import chex
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax.attribution import weighted_collapse
from attrjax.attribution._methods import class_maps
from attrjax._evaluation import localization_report, make_predict_fn
from attrjax._matching import matching_loss
from attrjax.attribution import lrp
from attrjax.models import init_variables, vgg
from attrjax.models._split import LinenSplitModel, NNXSplitModel, _calls_observed
from attrjax.models._vgg import vgg_split_model
from attrjax.training import (Objective, TrainState, data_mesh, jit_train_step, make_train_step, replicate, sgd,
                              shard_batch)


class Trunk(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        for index, width in enumerate((4, 6)):
            x = nn.Conv(width, (3, 3), name=f"conv{index}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{index}")(x)
            x = jax.nn.relu(x)
        return x


class Head(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, a, train):
        a = nn.Conv(5, (3, 3), strides=2, name="conv")(a)
        a = nn.BatchNorm(use_running_average=not train, name="bn")(a)
        a = nn.Dropout(0.5, deterministic=not train)(jnp.mean(jax.nn.relu(a), axis=(1, 2)))
        return nn.Dense(self.num_classes, name="fc")(a)


class UserCNN(nn.Module):
    """What a user brings: a plain linen classifier."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return Head(name="head")(Trunk(name="trunk")(x, train), train)


IMAGES = draws.normal(jax.random.key(0), (4, 8, 8, 3))
USER = LinenSplitModel(UserCNN(), IMAGES[:1])


def _user_variables():
    return USER.init(jax.random.key(1), IMAGES)


def test_linen_layers_are_its_submodules_that_output_feature_maps_in_forward_order():
    assert USER.layers == ("trunk.conv0", "trunk.bn0", "trunk.conv1", "trunk.bn1", "trunk", "head.conv", "head.bn")
    chex.assert_equal(USER.activation_shape(_user_variables(), IMAGES, "head.conv"), (4, 4, 4, 5))
    with pytest.raises(ValueError, match="unknown layer 'trunk.conv9'; this model has: trunk.conv0, trunk.bn0"):
        USER.linearize(_user_variables(), IMAGES, "trunk.conv9")


class TrunkOnly(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return Trunk(name="trunk")(x, train)


class HeadOnly(nn.Module):
    """The head under the same path as in ``UserCNN``, so dropout draws the same mask from the same rng."""

    @nn.compact
    def __call__(self, a, train):
        return Head(name="head")(a, train)


@pytest.mark.oldest
@pytest.mark.parametrize("train", [False, True])
def test_linen_linearization_equals_a_hand_written_vjp_of_the_head(train):
    variables = _user_variables()
    rng = jax.random.key(7)
    lin = USER.linearize(variables, IMAGES, "trunk", train=train, rng=rng)
    mutable = ["batch_stats"] if train else False
    trunk_out = TrunkOnly().apply(variables, IMAGES, train, mutable=mutable)
    activations = trunk_out[0] if train else trunk_out

    def head(a):
        out = HeadOnly().apply(variables, a, train, rngs={"dropout": rng}, mutable=mutable)
        return out[0] if train else out

    logits, vjp = jax.vjp(head, activations)
    cotangent = draws.normal(jax.random.key(3), logits.shape)
    chex.assert_trees_all_close(lin.activations, activations, atol=1e-6)
    chex.assert_trees_all_close(lin.logits, logits, atol=1e-6)
    chex.assert_trees_all_close(lin.vjp(cotangent), vjp(cotangent)[0], atol=1e-6)
    full_logits, state = USER.apply(variables, IMAGES, train=train, rng=rng)
    chex.assert_trees_all_close(lin.logits, full_logits, atol=1e-6)  # same pass, same dropout mask
    chex.assert_trees_all_close(lin.state, state)
    assert (set(state) == {"batch_stats"}) == train


def _vgg():
    model = vgg(((4,), (6,)), num_classes=3, image_size=8, attribution_layer="pool1")
    return model, vgg_split_model(model), init_variables(model, jax.random.key(1))


def test_the_vgg_adapter_equals_its_own_features_and_head():
    model, split, variables = _vgg()
    assert split.layers == model.layers[1:]
    lin = split.linearize(variables, IMAGES, "pool1")
    features = model.apply(variables, IMAGES, layer="pool1", method=type(model).features)
    logits, vjp = jax.vjp(lambda a: model.apply(variables, a, layer="pool1", method=type(model).head), features)
    cotangent = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3)
    chex.assert_trees_all_close(lin.logits, logits, atol=1e-6)
    chex.assert_trees_all_close(lin.vjp(cotangent), vjp(cotangent)[0], atol=1e-6)
    chex.assert_trees_all_close(split.apply(variables, IMAGES)[0], model.apply(variables, IMAGES), atol=1e-6)


@pytest.mark.parametrize("which", ["linen", "vgg"])
def test_the_double_backprop_matching_gradient_equals_finite_differences(which):
    with jax.enable_x64(True):  # central differences in float64
        if which == "linen":
            split, layer = LinenSplitModel(UserCNN(), IMAGES[:1].astype(jnp.float64)), "trunk"
        else:
            model = vgg(((4,), (6,)), num_classes=3, image_size=8, attribution_layer="pool1", dtype=jnp.float64)
            split, layer = vgg_split_model(model), "pool1"
        images = IMAGES.astype(jnp.float64)
        variables = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), split.init(jax.random.key(1), images))
        teacher_maps = jax.nn.relu(draws.normal(jax.random.key(5), split.activation_shape(
            variables, images, layer)[:3], jnp.float64))

        def loss(params):
            lin = split.linearize({**variables, "params": params}, images, layer)
            alpha = jnp.sum(lin.vjp(jax.nn.one_hot(jnp.argmax(lin.logits, -1), lin.logits.shape[-1])), axis=(1, 2))
            return matching_loss(teacher_maps, weighted_collapse(lin.activations, alpha))

        params = variables["params"]
        grads = jax.jit(jax.grad(loss))(params)
        loss = jax.jit(loss)  # (compiled once for both shifted evaluations)
        direction = jax.tree.map(lambda p: draws.normal(jax.random.key(11), p.shape, p.dtype), params)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        eps = 1e-6
        shifted = [loss(jax.tree.map(lambda p, d, s=s: p + s * eps * d, params, direction)) for s in (1, -1)]
        numeric = (shifted[0] - shifted[1]) / (2 * eps)
        assert float(jnp.abs(analytic)) > 1e-6
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5)


class WidthCNN(nn.Module):
    """A user's classifier family: same layers, any width."""

    width: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jax.nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3), name="stem")(x)))
        x = nn.Conv(self.width, (3, 3), strides=2, name="block")(x)
        x = nn.Dropout(0.3, deterministic=not train)(jnp.mean(jax.nn.relu(x), axis=(1, 2)))
        return nn.Dense(3, name="fc")(x)


def test_a_users_linen_pair_trains_with_kd_and_matching_compiling_once(tmp_path):
    teacher, student = WidthCNN(8), WidthCNN(4)
    teacher_variables = LinenSplitModel(teacher, IMAGES[:1]).init(jax.random.key(0), IMAGES)
    objective = Objective(kd="binary", matching="weighted", matching_weight=10.0, matching_layer="block")
    tx = sgd(0.05)
    step = jit_train_step(chex.assert_max_traces(make_train_step(student, tx, objective, teacher), n=1), data_mesh())
    state = replicate(TrainState.create(LinenSplitModel(student, IMAGES[:1]).init(jax.random.key(1), IMAGES), tx),
                      data_mesh())
    batch = shard_batch({"image": IMAGES, "labels": jnp.eye(3)[jnp.array([0, 1, 2, 0])]}, data_mesh())
    teacher_variables = replicate(teacher_variables, data_mesh())
    losses = []
    for _ in range(5):
        state, metrics = step(state, teacher_variables, batch, jax.random.key(2))
        losses.append(float(metrics["loss"]))
        assert float(metrics["matching_loss"]) > 0 and bool(metrics["state_finite"])
    assert losses[-1] < losses[0]
    assert set(state.batch_stats) == {"BatchNorm_0"}  # the student's train-mode BatchNorm statistics moved on
    with pytest.raises(ValueError, match="unknown layer 'stage9'; this model has: stem, BatchNorm_0, block"):
        make_train_step(student, tx, Objective(kd="binary", matching="weighted", matching_layer="stage9"),
                        teacher)(state, teacher_variables, batch, jax.random.key(2))
    with pytest.raises(ValueError, match="the teacher predicts 3 classes but the student 5"):
        five_way = VGGLikeFive()
        make_train_step(five_way, tx, Objective(kd="binary"), teacher)(
            TrainState.create(LinenSplitModel(five_way, IMAGES[:1]).init(jax.random.key(1), IMAGES), tx),
            teacher_variables, batch, jax.random.key(2))


class VGGLikeFive(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(5)(jnp.mean(nn.Conv(4, (3, 3), name="conv")(x), axis=(1, 2)))


def _user_class_maps(method, variables, **options):
    """``class_maps`` of the user's model on IMAGES, compiled as a whole (as the evaluation does)."""
    return jax.jit(lambda variables: class_maps(UserCNN(), variables, IMAGES, method, **options))(variables)


def test_a_users_linen_model_goes_through_the_evaluation():
    variables = _user_variables()
    maps, logits = _user_class_maps("gradcam", variables, layer="trunk")
    chex.assert_shape(maps, (4, 3, 8, 8))
    lin = USER.linearize(variables, IMAGES, "trunk")
    for k in range(3):  # each class's map is Grad-CAM from that class's own vjp
        alpha = jnp.sum(lin.vjp(jax.nn.one_hot(jnp.full((4,), k), 3)), axis=(1, 2))
        chex.assert_trees_all_close(maps[:, k], weighted_collapse(lin.activations, alpha), atol=1e-6)
    chex.assert_trees_all_close(make_predict_fn(UserCNN())(variables, IMAGES), logits, atol=1e-6)
    saliency_maps, _ = _user_class_maps("saliency", variables)
    chex.assert_shape(saliency_maps, (4, 3, 8, 8))
    lrp_maps, _ = _user_class_maps("lrp", variables)  # propagation methods take any model too
    chex.assert_shape(lrp_maps, (4, 3, 8, 8))
    chex.assert_trees_all_close(lrp_maps[:, 1], lrp(UserCNN(), variables, IMAGES, jnp.full((4,), 1)), atol=1e-6)
    masks = np.zeros((4, 8, 8), np.int32)
    masks[:, 2:5, 2:5] = np.array([1, 2, 3, 1])[:, None, None]  # class c + 1 marks class c's pixels
    batch = {"image": IMAGES, "mask": jnp.asarray(masks), "valid": np.ones(4, bool)}
    summary, _ = localization_report(UserCNN(), variables, [batch], layer="trunk", reference="self",
                                     faithfulness_steps=2, prediction_rule="top1")
    assert summary["map_cosine"] == 1.0 and 0.0 <= summary["deletion_auc"] <= 1.0
    assert summary["num_counted"] == int(np.sum(np.argmax(np.asarray(logits), -1) == np.array([0, 1, 2, 0])))


class UserNNX(nnx.Module):
    """A user's Flax NNX classifier."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.blocks = nnx.List([nnx.Conv(width, width, (3, 3), rngs=rngs),
                                nnx.Conv(width, 6, (3, 3), strides=2, rngs=rngs)])
        self.head_bn = nnx.BatchNorm(6, rngs=rngs)  # train-mode BatchNorm inside the head
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        for block in self.blocks:
            x = jax.nn.relu(block(x))
        return self.fc(self.drop(jnp.mean(self.head_bn(x), axis=(1, 2))))


def _nnx_split(width=4):
    return NNXSplitModel.from_module(UserNNX(width, nnx.Rngs(0)), IMAGES)


@pytest.mark.oldest
@pytest.mark.parametrize("train", [False, True])
def test_nnx_linearization_equals_a_perturbed_forward_and_finite_differences(train):
    split = _nnx_split()
    assert split.layers == ("conv1", "bn1", "blocks.0", "blocks.1", "head_bn")
    variables = split.init(None, IMAGES)
    rng = jax.random.key(4)
    lin = split.linearize(variables, IMAGES, "blocks.0", train=train, rng=rng)
    logits, state = split.apply(variables, IMAGES, train=train, rng=rng)
    chex.assert_trees_all_close(lin.logits, logits, atol=1e-6)  # one pass: same dropout mask, same statistics
    chex.assert_trees_all_close(lin.state, state)
    cotangent = draws.normal(jax.random.key(3), logits.shape)
    model = split._merged(variables, train, rng)
    if not train:  # eval mode is deterministic: the head after blocks.0, written out by hand
        def head(a):
            x = jax.nn.relu(model.blocks[1](jax.nn.relu(a)))
            return model.fc(model.drop(jnp.mean(model.head_bn(x), axis=(1, 2))))

        expected = jax.vjp(head, lin.activations)[1](cotangent)[0]
        chex.assert_trees_all_close(lin.vjp(cotangent), expected, atol=1e-6)
    else:  # dropout draws from the reseeded streams: central differences along a direction
        direction = draws.normal(jax.random.key(5), lin.activations.shape)
        eps = 1e-4

        def perturbed(scale):  # the forward pass with blocks.0's output moved along ``direction``
            model = split._merged(variables, train, rng)
            with _calls_observed([model.blocks[0]], lambda module, out: out + scale * direction):
                return jnp.vdot(cotangent, model(IMAGES))

        numeric = (perturbed(eps) - perturbed(-eps)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(lin.vjp(cotangent), direction)), float(numeric), rtol=2e-2)
    if train:
        assert not jnp.allclose(state["batch_stats"]["head_bn"]["mean"].value,
                                variables["batch_stats"]["head_bn"]["mean"].value)


def test_an_nnx_pair_trains_with_kd_and_matching_and_evaluates():
    teacher, student = _nnx_split(8), _nnx_split(4)
    objective = Objective(kd="binary", matching="weighted", matching_weight=10.0, matching_layer="blocks.1")
    tx = sgd(0.05)
    step = jit_train_step(chex.assert_max_traces(make_train_step(student, tx, objective, teacher), n=1), data_mesh())
    state = replicate(TrainState.create(student.init(None, IMAGES), tx), data_mesh())
    teacher_variables = replicate(teacher.init(None, IMAGES), data_mesh())
    batch = shard_batch({"image": IMAGES, "labels": jnp.eye(3)[jnp.array([0, 1, 2, 0])]}, data_mesh())
    losses = []
    for _ in range(4):
        state, metrics = step(state, teacher_variables, batch, jax.random.key(2))
        losses.append(float(metrics["loss"]))
        assert float(metrics["matching_loss"]) > 0
    assert losses[-1] < losses[0]
    maps, _ = class_maps(student, state.variables, IMAGES, "gradcam", layer="blocks.1")
    chex.assert_shape(maps, (4, 3, 4, 4))
    guided, _ = class_maps(student, state.variables, IMAGES, "guided_backprop")  # ReLUs found in the jaxpr
    chex.assert_shape(guided, (4, 3, 8, 8))
    assert float(jnp.sum(guided)) > 0


class ModeFreeCNN(nn.Module):
    """A linen classifier without a training mode: ``__call__`` takes only the images."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.mean(jax.nn.relu(nn.Conv(4, (3, 3), name="conv")(x)), axis=(1, 2)))


class TrainingKeywordCNN(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool = False):
        x = nn.BatchNorm(use_running_average=not training)(nn.Conv(4, (3, 3), name="conv")(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_a_linen_model_without_a_training_mode_trains_and_a_differently_named_one_is_named():
    model = LinenSplitModel(ModeFreeCNN(), IMAGES[:1])
    assert model.train_argument is None and model.layers == ("conv",)
    variables = model.init(jax.random.key(1), IMAGES)
    logits, state = model.apply(variables, IMAGES, train=True, rng=jax.random.key(2))
    chex.assert_trees_all_close(logits, ModeFreeCNN().apply(variables, IMAGES))
    assert state == {}
    with pytest.raises(ValueError, match=r"no 'train' argument \(its arguments: x, training\); pass "
                                         r"train_argument='training'"):
        LinenSplitModel(TrainingKeywordCNN(), IMAGES[:1])
    named = LinenSplitModel(TrainingKeywordCNN(), IMAGES[:1], train_argument="training")
    _, state = named.apply(named.init(jax.random.key(1), IMAGES), IMAGES, train=True)
    assert "batch_stats" in state


class DeterministicKeywordCNN(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.Dropout(0.5, deterministic=deterministic)(nn.Conv(4, (3, 3), name="conv")(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_an_inverted_mode_keyword_gets_the_opposite_of_train():
    # deterministic=True is eval mode: the error names it, and as train_argument it gets `not train`.
    with pytest.raises(ValueError, match=r"pass train_argument='deterministic'"):
        LinenSplitModel(DeterministicKeywordCNN(), IMAGES[:1])
    split = LinenSplitModel(DeterministicKeywordCNN(), IMAGES[:1], train_argument="deterministic")
    variables = split.init(jax.random.key(0), IMAGES)
    evaluated = [split.apply(variables, IMAGES)[0] for _ in range(2)]
    trained = [split.apply(variables, IMAGES, train=True, rng=jax.random.key(seed))[0] for seed in range(2)]
    np.testing.assert_array_equal(evaluated[0], evaluated[1])  # eval mode: no dropout
    assert float(jnp.abs(trained[0] - trained[1]).max()) > 1e-3  # train mode: dropout, a draw per rng


class ChannelsFirst(nn.Module):
    """An NCHW transpose: with 8 channels on 8 x 8 images its output has the shape of a (B,H,W,C) map."""

    @nn.compact
    def __call__(self, x):
        return jnp.transpose(x, (0, 3, 1, 2))


class TokenHeads(nn.Module):
    """A feature map, per-head attention projections of it (as tokens (B,T,D) and on the 4-D map) and NCHW."""

    @nn.compact
    def __call__(self, x):
        a = nn.Conv(8, (3, 3), name="conv")(x)
        query = nn.DenseGeneral((2, 3), name="query")(a.reshape(a.shape[0], -1, 8))  # kernel (D, heads, head_dim)
        query_4d = nn.DenseGeneral((2, 3), axis=(-2, -1), name="query_4d")(a)  # (B,H,heads,head_dim)
        nchw = ChannelsFirst(name="nchw")(a)
        pooled = jnp.mean(query, axis=(1, 2)) + jnp.mean(query_4d, axis=(1, 2)) + jnp.mean(nchw, axis=(2, 3))[:, :3]
        return nn.Dense(3, name="fc")(pooled)


def test_rank4_outputs_that_are_not_feature_maps_are_not_layers_and_are_refused_by_name():
    model = TokenHeads()
    split = LinenSplitModel(model, IMAGES[:1])
    chex.assert_equal(split.layers, ("conv",))
    variables = jax.eval_shape(split.init, jax.random.key(1), IMAGES)  # refused before anything is computed
    with pytest.raises(ValueError, match=r"layer 'query' outputs \(B, 64, 2, 3\) with axes \(batch, tokens\(8x8\), "
                                         r"mixed, mixed\), not a feature map \(batch, height, width, channels\)"):
        class_maps(model, variables, IMAGES, "gradcam", layer="query")
    with pytest.raises(ValueError, match=r"layer 'query_4d' outputs \(B, 8, 2, 3\) with axes \(batch, height, "
                                         r"mixed, mixed\)"):
        split.linearize(variables, IMAGES, "query_4d")
    with pytest.raises(ValueError, match=r"layer 'nchw' outputs \(B, 8, 8, 8\) with axes \(batch, channels, height, "
                                         r"width\).*transpose a channels-first output"):
        class_maps(model, variables, IMAGES, "gradcam", layer="nchw")


class NNXChannelsFirst(nnx.Module):
    def __call__(self, x):
        return jnp.transpose(x, (0, 3, 1, 2))


class NNXTokenHeads(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.query = nnx.LinearGeneral(8, (2, 3), rngs=rngs)  # kernel (D, heads, head_dim)
        self.nchw = NNXChannelsFirst()
        self.fc = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        a = self.conv(x)
        query = self.query(a.reshape(a.shape[0], -1, 8))
        return self.fc(jnp.mean(query, axis=(1, 2)) + jnp.mean(self.nchw(a), axis=(2, 3))[:, :3])


def test_nnx_rank4_outputs_that_are_not_feature_maps_are_not_layers_and_are_refused_by_name():
    split = NNXSplitModel.from_module(NNXTokenHeads(nnx.Rngs(0)), IMAGES)
    chex.assert_equal(split.layers, ("conv",))
    variables = split.init(None, IMAGES)
    with pytest.raises(ValueError, match=r"layer 'query' outputs \(B, 64, 2, 3\) with axes \(batch, tokens"):
        class_maps(split, variables, IMAGES, "gradcam", layer="query")
    with pytest.raises(ValueError, match=r"layer 'nchw' outputs \(B, 8, 8, 8\) with axes \(batch, channels"):
        split.linearize(variables, IMAGES, "nchw")


class MapZoo(nn.Module):
    """Layers that keep the (B,H,W,C) layout through reshapes, pools, grouped and transposed convolutions."""

    @nn.compact
    def __call__(self, x):
        x = nn.GroupNorm(num_groups=2, name="gn")(nn.Conv(8, (3, 3), name="conv")(x))  # splits C into groups
        x = nn.avg_pool(x, (2, 2), (2, 2)) + nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x)
        x = jnp.concatenate([x, nn.Dense(4, name="pointwise")(x)], axis=-1)
        x = nn.ConvTranspose(4, (2, 2), strides=(2, 2), name="up")(x)
        squeeze = nn.Dense(4, name="squeeze")(jnp.mean(x, axis=(1, 2), keepdims=True))  # (B,1,1,C): not spatial
        return nn.Dense(3)(jnp.mean(x * squeeze, axis=(1, 2)))


def test_layers_that_keep_the_map_layout_are_listed():
    split = LinenSplitModel(MapZoo(), IMAGES[:1])
    chex.assert_equal(split.layers, ("conv", "gn", "depthwise", "pointwise", "up"))
    assert "(batch, constant, constant, channels)" in split.not_feature_maps["squeeze"]
