"""Batched evaluation against a per-image, per-class loop of the single-class primitives."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.attribution import grad_cam, minmax_normalize, resize_maps
from attrjax._evaluation import (AttributionEvaluator, ClassificationEvaluator, classification_report,
                                localization_report)
from attrjax.metrics import curve_auc, mask_auc, pointing_game
from attrjax.models import VGG, init_variables, vgg
from tests.test_metrics import reference_average_precision

AGREEMENT_KEYS = ("map_cosine", "same_peak", "spearman", "top10_iou")


def _batches(images, masks, batch_size):
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        pad = batch_size - (stop - start)
        valid = np.arange(batch_size) < batch_size - pad
        yield {"image": np.concatenate([images[start:stop], images[:pad]]),
               "mask": np.concatenate([masks[start:stop], masks[:pad]]), "valid": valid}


def test_localization_report_matches_a_per_pair_loop():
    model = vgg(((4,), (8,)), num_classes=3, image_size=16)
    variables = init_variables(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 16, 16, 3)).astype(np.float32)
    masks = np.zeros((5, 16, 16), np.uint8)
    masks[:, 2:9, 3:11] = rng.integers(0, 4, size=(5, 1, 1))  # one class (or none) per image
    masks[:, 10:14, 10:15] = 2
    layer = "conv2_1"

    summary, _ = localization_report(model, variables, _batches(images, masks, 4), layer=layer,
                                     reference=(model, variables), prediction_rule="positive_logit")

    top1, _ = localization_report(model, variables, _batches(images, masks, 4), layer=layer, prediction_rule="top1")
    hits, aucs, all_hits, all_aucs, top1_hits = [], [], [], [], []
    for n in range(5):
        feats = model.apply(variables, images[n:n + 1], layer=layer, method=VGG.features)
        logits = model.apply(variables, feats, layer=layer, method=VGG.head)
        for c in range(3):
            target = masks[n] == c + 1
            if not target.any():
                continue
            heat = grad_cam(lambda a: model.apply(variables, a, layer=layer, method=VGG.head), feats,
                            jnp.array([c]))
            heat = minmax_normalize(resize_maps(heat, 16))
            all_hits.append(float(pointing_game(heat, target[None])[0]))
            all_aucs.append(float(mask_auc(heat, target[None])[0]))
            if logits[0, c] > 0:  # the paper's protocol: predicted pairs only
                hits.append(all_hits[-1])
                aucs.append(all_aucs[-1])
            if c == int(jnp.argmax(logits[0])):
                top1_hits.append(all_hits[-1])
    assert summary["num_counted"] == len(hits) >= 3  # the comparison is not vacuous
    assert top1["num_counted"] == len(top1_hits) < len(all_hits)  # another rule, another pair set ...
    for key in ("pointing_accuracy_all_present", "mean_auc_all_present"):  # ... but the common set is the same
        assert top1[key] == summary[key]
    np.testing.assert_allclose(summary["pointing_accuracy"], np.mean(hits) if hits else np.nan, rtol=1e-6)
    np.testing.assert_allclose(summary["mean_auc"], np.nanmean(aucs) if aucs else np.nan, rtol=1e-5)
    np.testing.assert_allclose(summary["pointing_accuracy_all_present"], np.mean(all_hits), rtol=1e-6)
    np.testing.assert_allclose(summary["mean_auc_all_present"], np.nanmean(all_aucs), rtol=1e-5)
    # A model agrees perfectly with itself.
    np.testing.assert_allclose(summary["map_cosine"], 1.0, rtol=1e-5)
    assert summary["same_peak"] == 1.0 and summary["top10_iou"] == 1.0
    np.testing.assert_allclose(summary["spearman"], 1.0, rtol=1e-6)


def test_faithfulness_in_the_report_matches_a_per_image_deletion_by_hand():
    """Deletion / insertion AUC of each image's top class, against a NumPy loop that perturbs pixels one image at a
    time in the order of the map (ties by position) and scores the class's sigmoid."""
    model = vgg(((4,), (8,)), num_classes=3, image_size=8)
    variables = init_variables(model, jax.random.key(1))
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
    masks = np.ones((3, 8, 8), np.uint8)
    steps = 4
    summary, _ = localization_report(model, variables, _batches(images, masks, 2), layer="conv2_1",
                                     faithfulness_steps=steps, prediction_rule="positive_logit")

    deletion, insertion = [], []
    for image in images:
        logits = np.asarray(model.apply(variables, image[None]))[0]
        top = int(np.argmax(logits))
        feats = model.apply(variables, image[None], layer="conv2_1", method=VGG.features)
        heat = grad_cam(lambda a: model.apply(variables, a, layer="conv2_1", method=VGG.head), feats,
                        jnp.array([top]))
        heat = np.asarray(minmax_normalize(resize_maps(heat, 8)))[0].reshape(-1)
        order = np.lexsort((np.arange(heat.size), -heat))  # descending, ties by position
        for insert, curves in ((False, deletion), (True, insertion)):
            points = []
            for i in range(steps + 1):
                chosen = np.zeros(heat.size, bool)
                chosen[order[:i * heat.size // steps]] = True
                chosen = chosen.reshape(8, 8, 1)
                perturbed = np.where(chosen, image, 0.0) if insert else np.where(chosen, 0.0, image)
                points.append(float(jax.nn.sigmoid(model.apply(variables, perturbed[None])[0, top])))
            curves.append(float(curve_auc(np.asarray(points))))
    np.testing.assert_allclose(summary["deletion_auc"], np.mean(deletion), rtol=1e-5)
    np.testing.assert_allclose(summary["insertion_auc"], np.mean(insertion), rtol=1e-5)


def _report_inputs():
    """Logits (6, 4) with ties, labels with one image and one class without a positive."""
    rng = np.random.default_rng(5)
    logits = np.round(rng.normal(size=(6, 4)), 1).astype(np.float32)
    labels = rng.random((6, 4)) < 0.5
    labels[:, 0] = labels[0, 1] = True
    labels[2] = False   # an image without a positive
    labels[:, 3] = False  # a class without a positive
    return logits, labels


def test_classification_report_leaves_out_and_counts_what_has_no_positive():
    logits, labels = _report_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        report = classification_report(logits, labels)
    sample_aps = [reference_average_precision(y, s) for y, s in zip(labels, logits) if y.any()]
    class_aps = [reference_average_precision(labels[:, k], logits[:, k]) for k in range(3)]
    predicted = logits >= 0.5
    f1 = [2 * (p & y).sum() / max(p.sum() + y.sum(), 1) for p, y in zip(predicted, labels)]
    assert report == pytest.approx({"sample_map": np.mean(sample_aps), "class_map": np.mean(class_aps),
                                    "f1": np.mean(f1), "num_images": 6, "num_images_without_positive": 1,
                                    "num_classes_without_positive": 1, "num_images_with_nonfinite_logits": 0},
                                   rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_classification_report_of_nonfinite_logits_is_nan(bad):
    logits, labels = _report_inputs()
    logits[4, 1] = logits[5, 2] = bad
    report = classification_report(logits, labels)
    assert all(math.isnan(report[key]) for key in ("sample_map", "class_map", "f1")), report
    assert report["num_images_with_nonfinite_logits"] == 2 and report["num_images"] == 6


def _tiny_setup():
    model = vgg(((4,), (8,)), num_classes=3, image_size=16)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(5, 16, 16, 3)).astype(np.float32)
    masks = np.zeros((5, 16, 16), np.uint8)
    masks[:, 2:9, 3:11] = 1
    masks[:, 10:14, 10:15] = 2
    masks[3, 0:2, 0:4] = 3
    return model, images, masks


def test_agreement_means_count_what_they_leave_out():
    model, images, masks = _tiny_setup()
    variables = init_variables(model, jax.random.key(4))
    own, examples = localization_report(model, variables, _batches(images, masks, 4), layer="conv2_1",
                                        keep_raw_maps=True, prediction_rule="positive_logit")
    raw = examples["raw_maps"]  # 2 batches of (4, 3, h, w), padding rows included
    reference = [batch.copy() for batch in raw]
    reference[0][1] = np.nan           # image 1: every class
    reference[1][0, 1] = 0.0           # image 4, class 1 (present): a zero map
    summary, _ = localization_report(model, variables, _batches(images, masks, 4), layer="conv2_1",
                                     reference=reference, prediction_rule="positive_logit")
    present = [(n, c) for n in range(5) for c in range(3) if (masks[n] == c + 1).any()]
    student = np.concatenate(raw)[:5]
    teacher = np.concatenate(reference)[:5]

    def comparable(m):
        return bool(np.isfinite(m).all() and m.max() > m.min())

    excluded = sum(not (comparable(student[n, c]) and comparable(teacher[n, c])) for n, c in present)
    assert 3 <= excluded < len(present)  # image 1's present classes and image 4's zero map, not everything
    for key in AGREEMENT_KEYS:
        assert summary[f"{key}_excluded"] == excluded, key
        assert summary[key] == 1.0, key  # the other pairs compare identical maps, which agree exactly


def test_agreement_with_nothing_comparable_is_nan_without_a_warning():
    model, images, masks = _tiny_setup()
    variables = init_variables(model, jax.random.key(4))
    zeros = [np.zeros((4, 3, 8, 8), np.float32)] * 2  # conv2_1 maps of a 16 px image are 8 x 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        summary, _ = localization_report(model, variables, _batches(images, masks, 4), layer="conv2_1",
                                         reference=zeros, prediction_rule="positive_logit")
    num_present = sum((masks[n] == c + 1).any() for n in range(5) for c in range(3))
    for key in AGREEMENT_KEYS:
        assert math.isnan(summary[key]) and summary[f"{key}_excluded"] == num_present, key


def test_self_reference_scores_the_model_against_its_own_maps():
    model, images, masks = _tiny_setup()
    variables = init_variables(model, jax.random.key(4))
    computed, _ = localization_report(model, variables, _batches(images, masks, 4), layer="conv2_1",
                                      reference=(model, variables), prediction_rule="positive_logit")
    own, _ = localization_report(model, variables, _batches(images, masks, 4), layer="conv2_1", reference="self",
                                 prediction_rule="positive_logit")
    assert own == computed
    broken = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), variables)
    nan_summary, _ = localization_report(model, broken, _batches(images, masks, 4), layer="conv2_1",
                                         reference="self", prediction_rule="positive_logit")
    num_present = sum((masks[n] == c + 1).any() for n in range(5) for c in range(3))
    for key in AGREEMENT_KEYS:
        assert math.isnan(nan_summary[key]) and nan_summary[f"{key}_excluded"] == num_present, key


def test_an_evaluator_built_once_scores_any_variables_of_its_model():
    """One AttributionEvaluator, two students: the same numbers as a fresh report each, compiled once; named
    metrics from run(); the classification evaluator reports what classification_report does."""
    model, images, masks = _tiny_setup()
    evaluator = AttributionEvaluator(model, layer="conv2_1", prediction_rule="positive_logit",
                                     faithfulness_steps=2)
    teacher = init_variables(model, jax.random.key(4))
    for seed in (5, 6):
        student = init_variables(model, jax.random.key(seed))
        fresh, _ = localization_report(model, student, _batches(images, masks, 4), layer="conv2_1",
                                       reference=(model, teacher), prediction_rule="positive_logit",
                                       faithfulness_steps=2)
        named = dict(evaluator.run(student, _batches(images, masks, 4), reference=(model, teacher)))
        assert named.keys() == fresh.keys() and {"map_cosine", "deletion_auc", "pointing_accuracy"} <= named.keys()
        np.testing.assert_allclose([named[k] for k in sorted(named)], [fresh[k] for k in sorted(fresh)], rtol=1e-6)
    assert evaluator.attribute._cache_size() == 1  # one compilation served both students
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
    batches = [{"image": images[:4], "labels": labels[:4], "valid": np.ones(4, bool)},
               {"image": np.concatenate([images[4:], images[:3]]), "labels": np.concatenate([labels[4:], labels[:3]]),
                "valid": np.arange(4) < 1}]
    classification = ClassificationEvaluator(model)
    logits, seen = classification.predictions(teacher, batches)
    np.testing.assert_array_equal(seen, labels)
    assert dict(classification.run(teacher, batches)) == classification_report(logits, labels)
    with pytest.raises(ValueError, match="no batches to evaluate"):
        evaluator.evaluate(teacher, [])
    with pytest.raises(ValueError, match="reference must be"):
        evaluator.evaluate(teacher, _batches(images, masks, 4), reference="teacher")


def test_evaluators_refuse_integer_images_and_class_index_labels():
    model, images, masks = _tiny_setup()
    variables = init_variables(model, jax.random.key(4))
    pixels = {"image": np.zeros((4, 16, 16, 3), np.uint8), "mask": masks[:4], "labels": np.eye(3)[[0, 1, 2, 0]],
              "valid": np.ones(4, bool)}
    message = r"eval batch: images must be floating point \(normalised floats\), got uint8"
    with pytest.raises(ValueError, match=message):
        ClassificationEvaluator(model).predictions(variables, [pixels])
    with pytest.raises(ValueError, match=message):
        AttributionEvaluator(model, layer="conv2_1", prediction_rule="top1").evaluate(variables, [pixels])
    indices = {"image": images[:3], "labels": np.array([0, 1, 2]), "valid": np.ones(3, bool)}  # B == K
    with pytest.raises(ValueError, match=r"labels must be \(B, K\) multi-hot for logits \(3, 3\) \(B, K\), got labels "
                                         r"of shape \(3,\).*one-hot them \(jax.nn.one_hot\(labels, 3\)"):
        dict(ClassificationEvaluator(model).run(variables, [indices]))
