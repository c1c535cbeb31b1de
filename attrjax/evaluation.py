"""Batched, jit-compiled evaluation of a model: predictions (PAPER.md §6.1) and Grad-CAM localisation (§6.2).

Every class of every image of a batch is attributed in one compiled call (``grad_cam_all_classes``), upsampled to
the image size, and scored against the segmentation masks.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.attribution import grad_cam_all_classes, minmax_normalize, resize_maps
from attrjax.metrics import (class_average_precision, f1_samples, localization_scores, map_cosine,
                             same_peak, sample_average_precision, summarize_localization)
from attrjax.models import VGG


def make_predict_fn(model: VGG) -> Callable:
    """``predict(variables, images (B,S,S,3)) -> logits (B,K)`` in eval mode, jitted."""
    return jax.jit(lambda variables, images: model.apply(variables, images))


def _all_class_grad_cam(model: VGG, layer: str) -> Callable:
    """``(variables, images) -> (maps (B,K,h,w), logits (B,K))``: Grad-CAM of every class at ``layer``."""

    def attribute(variables, images):
        feats = model.apply(variables, images, layer=layer, method=VGG.features)
        return grad_cam_all_classes(lambda a: model.apply(variables, a, layer=layer, method=VGG.head), feats)

    return attribute


def _evaluation_maps(raw_maps: jax.Array, image_size: int) -> jax.Array:
    """Raw maps (B,K,h,w) -> bilinearly upsampled to the image and min-max normalised (PAPER.md §6.2 steps 1-3)."""
    return minmax_normalize(resize_maps(raw_maps, image_size))


def make_attribution_fn(model: VGG, layer: str) -> Callable:
    """``attribute(variables, images) -> (maps (B,K,S,S), logits (B,K))``, jitted.

    Maps are Grad-CAM at ``layer`` for every class, bilinearly upsampled to the image size and min-max normalised
    per map (PAPER.md §6.2 steps 1-3).
    """
    grad_cams = _all_class_grad_cam(model, layer)

    def attribute(variables, images):
        maps, logits = grad_cams(variables, images)
        return _evaluation_maps(maps, images.shape[1]), logits

    return jax.jit(attribute)


def predict(model: VGG, variables: dict, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N,K) and labels (N,K) over padded eval batches (their ``valid`` rows only)."""
    predict_fn = make_predict_fn(model)
    logits, labels = [], []
    for batch in batches:
        valid = np.asarray(batch["valid"])
        logits.append(np.asarray(predict_fn(variables, batch["image"]))[valid])
        labels.append(np.asarray(batch["labels"])[valid])
    return np.concatenate(logits), np.concatenate(labels)


def classification_report(logits: np.ndarray, labels: np.ndarray, *, f1_threshold: float = 0.5) -> dict:
    """The paper's sample-averaged AP ("mAP"), VOC-style class-wise mAP, and sample F1 (logit >= threshold)."""
    return {
        "sample_map": float(jnp.nanmean(sample_average_precision(logits, labels))),
        "class_map": float(jnp.nanmean(class_average_precision(logits, labels))),
        "f1": float(jnp.mean(f1_samples(logits, labels, threshold=f1_threshold))),
        "num_images": int(len(logits)),
    }


def localization_report(model: VGG, variables: dict, batches: Iterable[dict], *, layer: str, tolerance: float = 0,
                        keep_maps: int = 0, reference: tuple[VGG, dict] | None = None) -> tuple[dict, dict]:
    """Pointing accuracy and mask AUC of Grad-CAM at ``layer`` over (image, class) pairs (PAPER.md §6.2), in one
    pass that computes each batch's maps once.

    A pair counts when the class is in the image's mask and the model predicts it (logit > 0).

    Args:
      reference: optional ``(model, variables)`` (e.g. the teacher) whose Grad-CAM at the same layer the maps are
        compared with on every pair whose class is present, whatever either model predicts: ``map_cosine`` (mean
        cosine similarity at the layer's own resolution) and ``same_peak`` (fraction of pairs whose maps peak at
        the same position).

    Returns:
      ``(summary, examples)``: the summary dict of ``summarize_localization`` (plus the agreement entries);
      ``examples`` holds the first ``keep_maps`` images' ``image``, ``mask``, ``maps`` (n,K,S,S) and ``logits``.
    """
    grad_cams = _all_class_grad_cam(model, layer)
    reference_grad_cams = _all_class_grad_cam(reference[0], layer) if reference is not None else None

    @jax.jit
    def evaluate_batch(variables, reference_variables, images, segmentation):
        raw_maps, logits = grad_cams(variables, images)
        maps = _evaluation_maps(raw_maps, images.shape[1])
        scores = localization_scores(maps, segmentation, logits, tolerance=tolerance)
        if reference_grad_cams is not None:
            reference_maps, _ = reference_grad_cams(reference_variables, images)
            scores.update(map_cosine=map_cosine(raw_maps, reference_maps),
                          same_peak=same_peak(raw_maps, reference_maps))
        return maps, logits, scores

    reference_variables = reference[1] if reference is not None else None
    per_batch, kept = [], []
    for batch in batches:
        maps, logits, scores = evaluate_batch(variables, reference_variables, batch["image"], batch["mask"])
        valid = np.asarray(batch["valid"])
        per_batch.append({key: np.asarray(value)[valid] for key, value in scores.items()})
        if sum(len(k["maps"]) for k in kept) < keep_maps:
            kept.append({key: np.asarray(value)[valid] for key, value in
                         {"image": batch["image"], "mask": batch["mask"], "maps": maps, "logits": logits}.items()})
    scores = {key: np.concatenate([s[key] for s in per_batch]) for key in per_batch[0]}
    summary = summarize_localization(scores)
    if reference is not None:
        present = scores["present"]
        summary.update(map_cosine=float(np.nanmean(scores["map_cosine"][present])),
                       same_peak=float(np.mean(scores["same_peak"][present])))
    examples = {key: np.concatenate([k[key] for k in kept])[:keep_maps] for key in kept[0]} if kept else {}
    return summary, examples
