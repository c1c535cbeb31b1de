"""Batched evaluation against a per-image, per-class loop of the single-class primitives."""

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.attribution import grad_cam, minmax_normalize, resize_maps
from attrjax.evaluation import localization_report
from attrjax.metrics import curve_auc, mask_auc, pointing_game
from attrjax.models import VGG, init_variables, vgg


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
                                     reference=(model, variables))

    hits, aucs = [], []
    for n in range(5):
        feats = model.apply(variables, images[n:n + 1], layer=layer, method=VGG.features)
        logits = model.apply(variables, feats, layer=layer, method=VGG.head)
        for c in range(3):
            target = masks[n] == c + 1
            if not target.any() or logits[0, c] <= 0:
                continue
            heat = grad_cam(lambda a: model.apply(variables, a, layer=layer, method=VGG.head), feats,
                            jnp.array([c]))
            heat = minmax_normalize(resize_maps(heat, 16))
            hits.append(float(pointing_game(heat, target[None])[0]))
            aucs.append(float(mask_auc(heat, target[None])[0]))
    assert summary["num_counted"] == len(hits) >= 3  # the comparison is not vacuous
    np.testing.assert_allclose(summary["pointing_accuracy"], np.mean(hits) if hits else np.nan, rtol=1e-6)
    np.testing.assert_allclose(summary["mean_auc"], np.nanmean(aucs) if aucs else np.nan, rtol=1e-5)
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
                                     faithfulness_steps=steps)

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
