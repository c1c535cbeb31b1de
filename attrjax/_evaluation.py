"""Batched, jit-compiled evaluation of a model: predictions and attribution localisation.

Evaluators are objects built once from a model (and an attribution method), whose compiled functions serve any
variables of that model; ``run(variables, batches)`` yields named metrics: ``ClassificationEvaluator`` (mAP, F1)
and ``AttributionEvaluator`` (pointing, mask AUC, agreement with a reference model, deletion / insertion AUC).
Every class of every image of a batch is attributed in one compiled call (``attribution.methods.class_maps``:
Grad-CAM, LRP, Excitation Backprop, the gradient family), upsampled to the image size, and scored against the
segmentation masks. Each batch is split over this process's devices (all of them by default, ``devices=`` to
choose), the variables copied to each.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.attribution import minmax_normalize, resize_maps
from attrjax.attribution._methods import check_method, class_maps
from attrjax.distributed import gather_rows
from attrjax.metrics import (class_average_precision, curve_auc, deletion_curve, f1_samples, insertion_curve,
                             localization_scores, map_cosine, same_peak, sample_average_precision, spearman_rank,
                             summarize_localization, top_k_iou)
from attrjax.metrics._localization import mean_or_nan
from attrjax.models import ModelLike, logits_fn
from attrjax.models._split import check_images
from attrjax.training._objective import check_labels
from attrjax.training._sharding import batch_sharding, data_mesh, replicated

AGREEMENT_KEYS = ("map_cosine", "same_peak", "spearman", "top10_iou")
"""The agreement scores (with a reference's maps) that ``AttributionEvaluator.evaluate`` reports when given a
``reference``."""


class _LocalPlacement:
    """Eval batches split over this process's ``devices`` (default: all of them) on their leading axis, variables
    copied to each: an evaluation uses every local accelerator, and a multi-process one gathers the processes'
    rows on the host (``attrjax.distributed.gather_rows``)."""

    def __init__(self, devices: Sequence[jax.Device] | None):
        devices = list(devices) if devices is not None else jax.local_devices()
        if not devices or any(device.process_index != jax.process_index() for device in devices):
            raise ValueError(f"an evaluation runs on devices of this process (jax.local_devices()), got {devices}")
        self.mesh = data_mesh(devices)

    def variables(self, variables):
        """``variables`` with a copy on every device."""
        return jax.device_put(variables, replicated(self.mesh))

    def rows(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """Arrays of one eval batch (leading axis B) split over the devices; B must be a multiple of their count."""
        count = self.mesh.devices.size
        for array in arrays:
            if np.shape(array)[0] % count:
                raise ValueError(f"an eval batch of {np.shape(array)[0]} rows does not split over the {count} "
                                 f"devices it is evaluated on; make the eval batch size a multiple of {count}, or "
                                 "pass devices= to evaluate on fewer")
        return tuple(jax.device_put(arrays, batch_sharding(self.mesh)))


def make_predict_fn(model) -> Callable:
    """``predict(variables, images (B,S,S,3)) -> logits (B,K)`` in eval mode, jitted, for any model that
    ``attrjax.models.as_split_model`` takes (a split model, attrjax's VGG, a Flax linen classifier)."""
    return jax.jit(lambda variables, images: logits_fn(model, variables)(images))


def _all_class_maps(model, layer: str | None, method: str, options: dict | None, class_chunk: int = 8) -> Callable:
    """``(variables, images) -> (maps (B,K,h,w), logits (B,K))``: ``method``'s map of every class."""
    check_method(method, layer)
    return functools.partial(class_maps, model, method=method, layer=layer, class_chunk=class_chunk,
                             **(options or {}))


def evaluation_maps(raw_maps: jax.Array, image_size: int) -> jax.Array:
    """Raw maps (B,K,h,w) -> bilinearly upsampled to the image and min-max normalised."""
    return minmax_normalize(resize_maps(raw_maps, image_size))


def make_attribution_fn(model, layer: str | None, method: str = "gradcam", method_options: dict | None = None, *,
                        class_chunk: int = 8) -> Callable:
    """``attribute(variables, images) -> (maps (B,K,S,S), logits (B,K))``, jitted.

    Maps are ``method``'s (Grad-CAM at ``layer`` by default) for every class, bilinearly upsampled to the image size
    and min-max normalised per map. ``class_chunk``: see ``attribution.methods.class_maps``.
    """
    all_class_maps = _all_class_maps(model, layer, method, method_options, class_chunk)

    def attribute(variables, images):
        maps, logits = all_class_maps(variables, images)
        return evaluation_maps(maps, images.shape[1]), logits

    return jax.jit(attribute)


def classification_report(logits: np.ndarray, labels: np.ndarray, *, f1_threshold: float = 0.5) -> dict:
    """The paper's sample-averaged AP ("mAP"), VOC-style class-wise mAP, and sample F1 (logit >= threshold).

    Args:
      logits: (N, K) float; labels: (N, K) bool or {0, 1}, entries > 0 are positives.

    Returns:
      Python numbers: ``sample_map``, the mean AP over the images with a positive label; ``class_map``, the mean
      AP over the classes with a positive image; ``f1``, the mean F1 over all images; ``num_images``;
      ``num_images_without_positive`` and ``num_classes_without_positive``, what the two mAPs leave out (their AP
      is undefined); ``num_images_with_nonfinite_logits``. A NaN or +-inf logit (an overflow: the metrics can
      rank +-inf, but a model that outputs it has diverged) makes all three means NaN: nothing is averaged over
      the remaining images as if the run were sound. A mean with nothing to average is NaN too.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    check_labels(labels, logits.shape, "multilabel")
    positive = labels > 0
    nonfinite = ~np.all(np.isfinite(logits), axis=-1)

    def mean(values, included):
        return math.nan if nonfinite.any() else mean_or_nan(np.asarray(values)[included])

    return {
        "sample_map": mean(sample_average_precision(logits, labels), positive.any(axis=1)),
        "class_map": mean(class_average_precision(logits, labels), positive.any(axis=0)),
        "f1": mean(f1_samples(logits, labels, threshold=f1_threshold), slice(None)),
        "num_images": int(len(logits)),
        "num_images_without_positive": int((~positive.any(axis=1)).sum()),
        "num_classes_without_positive": int((~positive.any(axis=0)).sum()),
        "num_images_with_nonfinite_logits": int(nonfinite.sum()),
    }


@functools.partial(jax.jit, static_argnums=(0, 1))
def _top_class_faithfulness(model, steps: int, variables: dict, images: jax.Array, maps: jax.Array,
                            logits: jax.Array) -> dict:
    """Deletion and insertion AUC (B,) of each image's top-scoring class, for maps (B,K,S,S) and logits (B,K); jitted
    once per model whatever the attribution method."""
    top = jnp.argmax(logits, axis=-1)
    top_maps = jnp.take_along_axis(maps, top[:, None, None, None], axis=1)[:, 0]  # (B,S,S)
    curve_args = (logits_fn(model, variables), images, top_maps, top)
    curve_kwargs: dict[str, Any] = dict(steps=steps, chunk_size=images.shape[0])
    return {"deletion_auc": curve_auc(deletion_curve(*curve_args, **curve_kwargs)),
            "insertion_auc": curve_auc(insertion_curve(*curve_args, **curve_kwargs))}


class ClassificationEvaluator:
    """Sample mAP, class mAP and sample F1 of a model (``classification_report``), its predict function compiled
    once for every variables it is run with.

    ``run(variables, batches)`` yields ``(name, value)`` pairs; ``batches`` are padded eval batches (``image``,
    ``labels``, ``valid``).
    """

    def __init__(self, model, *, f1_threshold: float = 0.5, devices: Sequence[jax.Device] | None = None):
        """``devices``: this process's devices each batch is split over (default: all of them)."""
        self.predict_fn = make_predict_fn(model)
        self.f1_threshold = f1_threshold
        self.placement = _LocalPlacement(devices)

    def predictions(self, variables: dict, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N,K) and labels (N,K) of the batches' ``valid`` rows; in a multi-process run, of every process's
        batches (its share of the split, ``eval_batches(..., shard=process_shard())``), in process order."""
        variables = self.placement.variables(variables)
        rows = [{"logits": np.asarray(self.predict_fn(variables, *self.placement.rows(_images(batch)))),
                 "labels": np.asarray(batch["labels"]), "valid": np.asarray(batch["valid"])} for batch in batches]
        if not rows:
            raise ValueError("no batches to evaluate: pass at least one eval batch")
        rows = gather_rows(_concatenated(rows))
        return rows["logits"][rows["valid"]], rows["labels"][rows["valid"]]

    def run(self, variables: dict, batches: Iterable[dict]) -> Iterator[tuple[str, float]]:
        """``(name, value)`` pairs of ``classification_report`` over the valid rows of ``batches``."""
        yield from classification_report(*self.predictions(variables, batches),
                                         f1_threshold=self.f1_threshold).items()


def predict(model, variables: dict, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N,K) and labels (N,K) over padded eval batches (their ``valid`` rows only)."""
    return ClassificationEvaluator(model).predictions(variables, batches)


Reference = tuple[object, dict] | Sequence[np.ndarray] | Literal["self"] | None


class AttributionEvaluator:
    """How well one attribution method's maps localise, agree with a reference's and explain the prediction.

    Built once for a model and a method (its functions compile on the first batch and are reused for any variables
    of that model, e.g. the naive and the matched student of one architecture), then run on any variables:
    ``evaluate`` returns ``(summary, examples)``, ``run`` yields the summary's ``(name, value)`` pairs. Every batch's
    maps (every class of every image, one compiled call) are computed once and serve all metrics.

    A pair (image, class) counts for pointing and mask AUC when the class is in the image's mask and the model
    predicts it (``prediction_rule``, see ``attrjax.metrics.predicted_classes``: ``positive_logit`` (logit > 0)
    for multi-label models, ``top1`` for single-label ones; required, since the wrong rule silently scores other
    pairs).

    Args:
      model: anything ``attrjax.models.as_split_model`` takes.
      layer: the layer Grad-CAM and EBP attribute at (required for them; the other methods need none).
      method: the attribution method's name (``attrjax.attribution.class_maps``).
      method_options: its keyword arguments.
      tolerance: the pointing game's tolerance in pixels.
      faithfulness_steps: when > 0, also the deletion and insertion AUC (``attrjax.metrics.deletion_curve``, that many
        increments, the zero image as baseline, sigmoid scores) of each image's top-scoring class and its map:
        ``deletion_auc`` (lower = more faithful) and ``insertion_auc`` (higher), means over images, NaN as soon
        as one image's map or logits hold a NaN. Costs 2 x (steps + 1) forward passes per image.
      devices: this process's devices each batch is split over (default: all of them); the eval batch size must be
        a multiple of their count.
    """

    def __init__(self, model: ModelLike, *, prediction_rule: str, layer: str | None = None, method: str = "gradcam",
                 method_options: dict | None = None, tolerance: float = 0, faithfulness_steps: int = 0,
                 devices: Sequence[jax.Device] | None = None):
        if isinstance(faithfulness_steps, bool) or not isinstance(faithfulness_steps, int) or faithfulness_steps < 0:
            raise ValueError(f"faithfulness_steps must be an int >= 0 (0 = off), got {faithfulness_steps!r}")
        self.model, self.layer, self.method, self.method_options = model, layer, method, method_options
        self.faithfulness_steps = faithfulness_steps
        self.attribute = jax.jit(_all_class_maps(model, layer, method, method_options))
        self._reference_attributions = {id(model): (model, self.attribute)}  # id -> (model, compiled maps)
        self.score_batch = jax.jit(functools.partial(batch_scores, tolerance=tolerance,
                                                     prediction_rule=prediction_rule))
        self.placement = _LocalPlacement(devices)

    def run(self, variables: dict, batches: Iterable[dict], *, reference: Reference = None
            ) -> Iterator[tuple[str, float]]:
        """``(name, value)`` pairs of ``evaluate``'s summary."""
        yield from self.evaluate(variables, batches, reference=reference)[0].items()

    def evaluate(self, variables: dict, batches: Iterable[dict], *, reference: Reference = None, keep_maps: int = 0,
                 keep_raw_maps: bool = False) -> tuple[dict, dict]:
        """Pointing accuracy and mask AUC over (image, class) pairs, agreement with ``reference`` and faithfulness.

        Args:
          batches: padded eval batches with ``image``, ``mask`` (B,S,S) segmentation (class c + 1 marks class c)
            and ``valid``.
          reference: optional ``(model, variables)`` (e.g. the teacher) whose maps by the same method (at the same
            layer) the maps are compared with on every pair whose class is present, whatever either model
            predicts: ``map_cosine`` (mean cosine similarity), ``same_peak`` (fraction of pairs whose maps peak at
            the same position), ``spearman`` (mean Spearman rank correlation of the pixels) and ``top10_iou`` (mean
            IoU of the two maps' top-10% pixels), all at the maps' own resolution. A pair where either map has a
            NaN / inf pixel or is constant (e.g. all zero) has none of them (``attrjax.metrics``): it is left out
            of the means and counted in ``map_cosine_excluded``, ``same_peak_excluded``, ``spearman_excluded`` and
            ``top10_iou_excluded``; a mean over no pair is NaN. Or the reference's raw maps per batch,
            ``examples["raw_maps"]`` of an earlier evaluation over the same batches, so a teacher's maps are
            computed once for many students. Or ``"self"``: the model's own maps, computed once, so a teacher's
            agreement with itself is measured (1 where defined; NaN for a broken model) rather than assumed.
          keep_maps: return the first ``keep_maps`` images' ``image``, ``mask``, ``maps`` (n,K,S,S) and ``logits``.
          keep_raw_maps: also return every batch's raw maps (B,K,h,w), padding rows included, as
            ``examples["raw_maps"]``.

        Returns:
          ``(summary, examples)``: the summary dict of ``summarize_localization`` (plus the agreement entries and
          their ``*_excluded`` counts and the faithfulness AUCs) and the kept examples.
        """
        variables = self.placement.variables(variables)
        reference_maps_of = self._reference_maps_fn(reference)
        per_batch: list[dict] = []
        per_image: list[dict] = []
        valid_rows: list[np.ndarray] = []
        kept: list[dict[str, np.ndarray]] = []
        raw_per_batch: list[np.ndarray] = []
        for index, batch in enumerate(batches):
            images, masks = self.placement.rows(_images(batch), batch["mask"])
            raw_maps, logits = self.attribute(variables, images)
            maps, scores = self.score_batch(raw_maps, logits, masks, reference_maps_of(index, images, raw_maps))
            if keep_raw_maps:
                raw_per_batch.append(np.asarray(raw_maps))
            valid = np.asarray(batch["valid"])
            valid_rows.append(valid)
            per_batch.append(jax.tree.map(np.asarray, scores))
            if self.faithfulness_steps:
                curves = _top_class_faithfulness(self.model, self.faithfulness_steps, variables, images, maps, logits)
                per_image.append(jax.tree.map(np.asarray, curves))
            if sum(len(k["maps"]) for k in kept) < keep_maps:
                kept.append({key: np.asarray(value)[valid] for key, value in
                             {"image": batch["image"], "mask": batch["mask"], "maps": maps, "logits": logits}.items()})
        if not per_batch:
            raise ValueError("no batches to evaluate: pass at least one eval batch")
        all_scores, all_curves, valid = gather_rows(
            (_concatenated(per_batch), _concatenated(per_image), np.concatenate(valid_rows)))
        summary = summarize_scores({key: value[valid] for key, value in all_scores.items()})
        if self.faithfulness_steps:
            summary.update({key: float(np.mean(value[valid])) for key, value in all_curves.items()})
        examples: dict[str, Any] = ({key: np.concatenate([k[key] for k in kept])[:keep_maps] for key in kept[0]}
                                    if kept else {})
        if keep_raw_maps:
            examples["raw_maps"] = raw_per_batch
        return summary, examples

    def _reference_maps_fn(self, reference: Reference) -> Callable:
        """``(batch index, placed images, own raw maps) -> the reference's raw maps, or None``."""
        if reference is None:
            return lambda index, images, raw_maps: None
        if isinstance(reference, str):
            if reference != "self":
                raise ValueError(f"reference must be (model, variables), per-batch raw maps, 'self' or None, got "
                                 f"{reference!r}")
            return lambda index, images, raw_maps: raw_maps
        if isinstance(reference, tuple):
            attribute_reference = self._reference_attribution(reference[0])
            reference_variables = self.placement.variables(reference[1])
            return lambda index, images, raw_maps: attribute_reference(reference_variables, images)[0]
        return lambda index, images, raw_maps: self.placement.rows(np.asarray(reference[index]))[0]


    def _reference_attribution(self, model) -> Callable:
        """The compiled all-class maps of a reference model, built once per model (the entry keeps the model alive,
        so its id stays its own)."""
        if id(model) not in self._reference_attributions:
            maps_fn = jax.jit(_all_class_maps(model, self.layer, self.method, self.method_options))
            self._reference_attributions[id(model)] = (model, maps_fn)
        return self._reference_attributions[id(model)][1]


def _images(batch: dict):
    """The batch's images (B,S,S,3), refused unless floating point."""
    check_images(batch["image"], "eval batch")
    return batch["image"]


def _concatenated(batches: list):
    """Per-batch pytrees of arrays -> one pytree of them concatenated along the row axis (``{}`` for none)."""
    return jax.tree.map(lambda *rows: np.concatenate(rows), *batches) if batches else {}


def batch_scores(raw_maps: jax.Array, logits: jax.Array, segmentation: jax.Array, reference_maps: jax.Array | None,
                 *, tolerance: float, prediction_rule: str) -> tuple[jax.Array, dict]:
    """``(maps (B,K,S,S), scores)`` of one batch: raw maps (B,K,h,w) upsampled to the segmentation (B,S,S) and
    min-max normalised, and per pair (B,K) the localisation scores (``attrjax.metrics.localization_scores``) and, with
    reference maps (B,K,h,w), the agreement scores ``map_cosine``, ``same_peak``, ``spearman`` and ``top10_iou``."""
    maps = evaluation_maps(raw_maps, segmentation.shape[-1])
    scores = localization_scores(maps, segmentation, logits, tolerance=tolerance, prediction_rule=prediction_rule)
    if reference_maps is not None:
        scores.update(map_cosine=map_cosine(raw_maps, reference_maps), same_peak=same_peak(raw_maps, reference_maps),
                      spearman=spearman_rank(raw_maps, reference_maps),
                      top10_iou=top_k_iou(raw_maps, reference_maps, 0.1))
    return maps, scores


def summarize_scores(scores: dict) -> dict:
    """The summary of per-pair scores (N,K) of all batches: ``summarize_localization``'s and, where agreement
    scores are present, their means over the present pairs where they are defined and the ``*_excluded`` counts."""
    summary = summarize_localization(scores)
    for key in AGREEMENT_KEYS:
        if key in scores:
            values = scores[key][scores["present"]]
            defined = values[~np.isnan(values)]
            summary.update({key: mean_or_nan(defined), f"{key}_excluded": int(values.size - defined.size)})
    return summary


def localization_report(model, variables: dict, batches: Iterable[dict], *, layer: str, prediction_rule: str,
                        tolerance: float = 0, keep_maps: int = 0, reference: Reference = None,
                        method: str = "gradcam", method_options: dict | None = None,
                        keep_raw_maps: bool = False, faithfulness_steps: int = 0) -> tuple[dict, dict]:
    """One ``AttributionEvaluator(model, ...).evaluate(variables, batches, ...)``: see there for every argument."""
    evaluator = AttributionEvaluator(model, layer=layer, prediction_rule=prediction_rule, method=method,
                                     method_options=method_options, tolerance=tolerance,
                                     faithfulness_steps=faithfulness_steps)
    return evaluator.evaluate(variables, batches, reference=reference, keep_maps=keep_maps,
                              keep_raw_maps=keep_raw_maps)
