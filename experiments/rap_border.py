"""RAP's border artefact, measured: how much positive RAP relevance lies on the image border, and why.

    python -m experiments.rap_border --workdir runs/demo [--config quick] [--config.eval.localization_images=200]

For the teacher and every student of a finished demo run, on the first ``eval.localization_images`` localisation
images (all if 0), attributing each image's top-1 class: the share of the positive map mass in the two outermost
pixel rings (their share of the area is printed too) for

- RAP (positive part, as the evaluation reads it), over all images and split by the sign of the top-1 logit;
- RAP with the shift left out of its hidden rule (an ablation: no longer conservative);
- LRP (the paper's composite) and input x gradient, for comparison.

Writes ``rap_border.json`` and ``rap_border.md`` into the work directory.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from attrjax import distributed
from attrjax.attribution import input_x_gradient, lrp, propagation_maps, rap, rap_composite
from attrjax.attribution._rap import RapHidden
from attrjax.data._pipeline import normalize
from attrjax.models import logits_fn
from experiments import datasets, evaluate, models, runs
from experiments.distill import student_runs


def border_rings(size: int, width: int = 2) -> np.ndarray:
    """(size, size) bool: the ``width`` outermost pixel rings."""
    distance = np.minimum(np.arange(size), size - 1 - np.arange(size))
    return np.minimum.outer(distance, distance) < width


def border_share(maps: np.ndarray, border: np.ndarray) -> np.ndarray:
    """(B,) share of each map's positive mass on ``border``; NaN for a map with none."""
    maps = np.maximum(np.asarray(maps, np.float64), 0.0)
    total = maps.sum((1, 2))
    return np.where(total > 0, maps[:, border].sum(-1) / np.where(total > 0, total, 1.0), np.nan)


def without_shift(model, variables, images, target) -> jax.Array:
    composite = dataclasses.replace(rap_composite(), default=RapHidden(shift=False))
    return propagation_maps(model, variables, images, target, composite, start="weight")


def measure(model, variables, images: jax.Array, border: np.ndarray) -> dict:
    logits = logits_fn(model, variables)(images)
    target = jnp.argmax(logits, -1)
    confident = np.asarray(logits[jnp.arange(len(target)), target]) > 0
    rap_share = border_share(rap(model, variables, images, target), border)

    def mean(values):
        return float(np.nanmean(values)) if np.any(~np.isnan(values)) else None

    return {
        "top1_logit_positive": float(confident.mean()),
        "rap": mean(rap_share),
        "rap_logit_positive": mean(rap_share[confident]),
        "rap_logit_not_positive": mean(rap_share[~confident]),
        "rap_without_shift": mean(border_share(without_shift(model, variables, images, target), border)),
        "lrp": mean(border_share(lrp(model, variables, images, target), border)),
        "input_x_gradient": mean(border_share(input_x_gradient(logits_fn(model, variables), images, target),
                                              border)),
    }


COLUMNS = ("top1_logit_positive", "rap", "rap_logit_positive", "rap_logit_not_positive", "rap_without_shift", "lrp",
           "input_x_gradient")


def markdown(rows: dict, area: float, count: int) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [f"Share of the positive map mass in the two outermost pixel rings ({area:.1%} of the area), {count} "
             "localisation images, top-1 class.", "",
             "| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {name} | " + " | ".join(cell(row[key]) for key in COLUMNS) + " |" for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def run(config, workdir: str) -> dict:
    splits = datasets.load_splits(config, workdir)
    localization = evaluate.first_images(splits["localization"], config.eval.localization_images)
    images = jnp.asarray(normalize(localization["image"], datasets.normalization(config)))
    border = border_rings(images.shape[1])
    trained = {"teacher": runs.load_teacher(config, workdir, dtype=jnp.float32)}
    for name, run_config in student_runs(config).items():
        trained[name] = runs.load_trained(name, run_config, models.compression_objective(config, run_config), config,
                                          workdir, dtype=jnp.float32)
    rows = {}
    for name, (model, variables) in trained.items():
        rows[name] = measure(model, variables, images, border)
        print(name, {key: None if value is None else round(value, 3) for key, value in rows[name].items()}, flush=True)
    text = markdown(rows, float(border.mean()), len(images))
    print("\n" + text)
    if not distributed.is_primary():
        return rows
    with open(os.path.join(workdir, "rap_border.json"), "w") as f:
        json.dump({"border_area": float(border.mean()), "images": len(images), "models": rows}, f, indent=2)
    with open(os.path.join(workdir, "rap_border.md"), "w") as f:
        f.write(text)
    return rows


def main():
    runs.main_for(run, __doc__)


if __name__ == "__main__":
    main()
