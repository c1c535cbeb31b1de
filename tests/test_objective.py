"""Loss terms compose: ``Objective`` equals its terms, matching at several layers equals matching at each one
alone, any attribution map goes, and one forward pass linearises a model at several layers exactly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import draws
from attrjax.attribution import lrp
from attrjax._matching import matching_loss
from attrjax.models import vgg
from attrjax.models._split import LinenSplitModel, NNXSplitModel
from attrjax.models._vgg import vgg_split_model
from attrjax.training import (AttributionMatching, DistillationLoss, Objective, PropagationMatching, TaskLoss,
                           activation_map, gradcam_map, make_loss_fn, read_run_config, sgd, train)
from attrjax.training import RunOptions
from tests.test_split_models import IMAGES, UserCNN, UserNNX

LABELS = jnp.eye(3)[jnp.array([0, 1, 2, 0])]
BATCH = {"image": IMAGES, "labels": LABELS}


def _split_models():
    model = vgg(((4,), (6,)), num_classes=3, image_size=8, attribution_layer="pool1")
    return {"linen": (LinenSplitModel(UserCNN(), IMAGES[:1]), ("trunk.conv1", "trunk", "head.conv")),
            "nnx": (NNXSplitModel.from_module(UserNNX(4, nnx.Rngs(0)), IMAGES), ("bn1", "blocks.0", "blocks.1")),
            "vgg": (vgg_split_model(model), ("conv1_1", "pool1", "conv2_1"))}


@pytest.mark.parametrize("which", ["linen", "nnx", "vgg"])
@pytest.mark.parametrize("train", [False, True])
def test_linearizing_at_several_layers_equals_linearizing_at_each(which, train):
    split, layers = _split_models()[which]
    variables = split.init(jax.random.key(1), IMAGES)
    rng = jax.random.key(7)
    lin = split.linearize_layers(variables, IMAGES, layers, train=train, rng=rng)
    cotangent = draws.normal(jax.random.key(3), lin.logits.shape)
    gradients = lin.vjp(cotangent)
    assert set(lin.activations) == set(gradients) == set(layers)
    for layer in layers:
        single = split.linearize(variables, IMAGES, layer, train=train, rng=rng)
        chex.assert_trees_all_close(lin.logits, single.logits, atol=1e-6)
        chex.assert_trees_all_close(lin.state, single.state, atol=1e-6)
        chex.assert_trees_all_close(lin.activations[layer], single.activations, atol=1e-6)
        chex.assert_trees_all_close(gradients[layer], single.vjp(cotangent), atol=1e-5)


def _pair():
    teacher = LinenSplitModel(UserCNN(), IMAGES[:1])
    return teacher, teacher.init(jax.random.key(0), IMAGES), teacher.init(jax.random.key(1), IMAGES)


def _loss_and_grads(objective, teacher, teacher_variables, student_variables):
    loss_fn = make_loss_fn(teacher, objective, teacher)

    def loss(params):
        return loss_fn(params, student_variables["batch_stats"], teacher_variables, BATCH, jax.random.key(2))

    (value, (_, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(student_variables["params"])
    return value, metrics, grads


def test_an_objective_is_the_sum_of_its_terms():
    teacher, teacher_variables, student_variables = _pair()
    objective = Objective(kd="binary", matching="weighted", matching_weight=10.0, matching_layer="trunk")
    terms = [DistillationLoss("binary"), AttributionMatching("trunk", weight=10.0)]
    built = _loss_and_grads(objective, teacher, teacher_variables, student_variables)
    composed = _loss_and_grads(terms, teacher, teacher_variables, student_variables)
    chex.assert_trees_all_close(built, composed)
    _, metrics, _ = built
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["task_loss"]) + 10.0 * float(metrics["matching_loss"]), rtol=1e-6)


def test_matching_at_two_layers_is_the_sum_of_matching_at_each():
    """One linearisation at both layers gives the values and gradients of two separate single-layer objectives."""
    teacher, teacher_variables, student_variables = _pair()
    both = [TaskLoss(), AttributionMatching("trunk", 3.0, name="match/trunk"),
            AttributionMatching("head.conv", 5.0, activation_map, name="match/head")]
    value, metrics, grads = _loss_and_grads(both, teacher, teacher_variables, student_variables)
    parts = [_loss_and_grads([term], teacher, teacher_variables, student_variables) for term in both]
    for term, (part_value, part_metrics, _) in zip(both, parts):
        np.testing.assert_allclose(float(metrics[term.name]), float(part_metrics[term.name]), rtol=1e-5)
        assert float(part_metrics[term.name]) > 0
    # Each part's loss is already its term times the term's weight.
    chex.assert_trees_all_close(grads, jax.tree.map(lambda *g: sum(g), *[part[2] for part in parts]), atol=1e-5)
    np.testing.assert_allclose(float(value), sum(float(part[0]) for part in parts), rtol=1e-5)


def test_a_users_own_attribution_map_is_matched():
    """A map of activations and gradients (here |A * dT/dA| summed over channels) against one computed by hand."""
    teacher, teacher_variables, student_variables = _pair()

    def gradient_times_activation(activations, gradients):
        return jnp.sum(jnp.abs(activations * gradients), axis=-1)

    _, metrics, _ = _loss_and_grads([TaskLoss(), AttributionMatching("trunk", 1.0, gradient_times_activation)],
                                    teacher, teacher_variables, student_variables)
    teacher_lin = teacher.linearize(teacher_variables, IMAGES, "trunk")
    target = jax.nn.one_hot(jnp.argmax(teacher_lin.logits, -1), 3)
    student_lin = teacher.linearize(student_variables, IMAGES, "trunk", train=True,
                                    rng=jax.random.split(jax.random.key(2))[0])
    expected = matching_loss(gradient_times_activation(teacher_lin.activations, teacher_lin.vjp(target)),
                             gradient_times_activation(student_lin.activations, student_lin.vjp(target)))
    np.testing.assert_allclose(float(metrics["matching_loss"]), float(expected), rtol=1e-5)
    assert gradcam_map(teacher_lin.activations, teacher_lin.vjp(target)).shape == (4, 8, 8)


def test_lrp_matching_compares_the_eval_mode_lrp_maps_and_its_gradient_is_their_derivative():
    """The term equals the matching loss of ``lrp`` maps computed directly (eval-mode networks, the teacher's top-1
    class), and its gradient is the directional derivative (central differences in a random direction)."""
    teacher, teacher_variables, student_variables = _pair()
    value, metrics, grads = _loss_and_grads([PropagationMatching()], teacher, teacher_variables, student_variables)
    target = jnp.argmax(teacher.apply(teacher_variables, IMAGES)[0], -1)

    @jax.jit
    def direct(params):
        student_maps = lrp(teacher, {**student_variables, "params": params}, IMAGES, target)
        return matching_loss(lrp(teacher, teacher_variables, IMAGES, target), student_maps)

    params = student_variables["params"]
    np.testing.assert_allclose(float(metrics["matching_loss"]), float(direct(params)), rtol=1e-5)
    assert Objective(kd="binary", matching="lrp", matching_weight=2.0).terms()[1] == PropagationMatching(weight=2.0)
    direction = jax.tree.map(lambda p: draws.normal(jax.random.key(p.size), p.shape), params)
    step = 1e-3
    moved = [jax.tree.map(lambda p, d, s=sign: p + s * step * d, params, direction) for sign in (1.0, -1.0)]
    numeric = (float(direct(moved[0])) - float(direct(moved[1]))) / (2 * step)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numeric, rtol=5e-2)


def test_composed_terms_train_and_are_recorded_with_the_run(tmp_path):
    teacher, teacher_variables, student_variables = _pair()
    terms = [DistillationLoss(temperature=2.0), AttributionMatching("trunk", 10.0, drop_rate=0.5)]

    def batches(start):
        while True:
            yield dict(BATCH)

    lines = []
    _, history = train(teacher, student_variables, sgd(0.05), terms, batches, 2, rng=jax.random.key(0),
                       teacher=teacher, teacher_variables=teacher_variables,
                       run=RunOptions(checkpoint_dir=str(tmp_path / "run"), log_every=1, log=lines.append))
    assert "matching_loss" in lines[-1] and history[-1]["matching_loss"] > 0
    assert "step 1/2, about " in lines[0] and "step 2/2  " in lines[-1]
    recorded = read_run_config(str(tmp_path / "run"))["config"]["objective"]["terms"]
    assert recorded[1] == {"term": "AttributionMatching", "layer": "trunk", "weight": 10.0,
                           "attribution": "attrjax.training._objective.gradcam_map", "drop_rate": 0.5,
                           "name": "matching_loss"}
    with pytest.raises(ValueError, match="objective.terms"):  # another weight is another run
        train(teacher, student_variables, sgd(0.05), [terms[0], AttributionMatching("trunk", 20.0, drop_rate=0.5)],
              batches, 2, rng=jax.random.key(0), teacher=teacher, teacher_variables=teacher_variables,
              run=RunOptions(checkpoint_dir=str(tmp_path / "run"), log=lines.append))


def test_bad_terms_are_refused_with_what_to_change():
    teacher, teacher_variables, student_variables = _pair()
    with pytest.raises(ValueError, match="rename \\['matching_loss'\\] with name="):
        make_loss_fn(teacher, [TaskLoss(), AttributionMatching("trunk"), AttributionMatching("head.conv")], teacher)
    with pytest.raises(TypeError, match="non-empty sequence of loss terms"):
        make_loss_fn(teacher, [], teacher)
    with pytest.raises(TypeError, match="non-empty sequence of loss terms"):
        make_loss_fn(teacher, ["task_loss"], teacher)
    with pytest.raises(ValueError, match="weight of loss term 'matching_loss' must be a number >= 0"):
        AttributionMatching("trunk", weight=-1.0)
    with pytest.raises(TypeError, match="attribution must be a function"):
        AttributionMatching("trunk", attribution="gradcam")
    with pytest.raises(ValueError, match="labels must be one of"):
        TaskLoss("multi")
    with pytest.raises(ValueError, match="need a teacher"):
        make_loss_fn(teacher, [AttributionMatching("trunk")])
    with pytest.raises(ValueError, match="unknown layer 'trunk.conv9'; this model has: trunk.conv0"):
        _loss_and_grads([TaskLoss(), AttributionMatching("trunk"), AttributionMatching("trunk.conv9", name="m2")],
                        teacher, teacher_variables, student_variables)
    narrow = vgg(((4,), (6,)), num_classes=3, image_size=8)
    with pytest.raises(ValueError, match="the teacher has no layer 'trunk'; it has: input, conv1_1"):
        make_loss_fn(narrow, [AttributionMatching("trunk")], narrow)
