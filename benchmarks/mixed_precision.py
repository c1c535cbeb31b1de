"""What bfloat16 compute does to trained networks' maps and to the matching gradient, against float32.

    python -m benchmarks.mixed_precision --workdir runs/demo [--config quick] [--config.KEY=VALUE ...] [--images 200]

Loads the float32-trained teacher and students of a work directory (``make demo`` writes one), builds each again
computing in bfloat16 with the same variables, and prints one JSON object:
  maps: per model, the cosine of its Grad-CAM maps (every present class of every localisation image, at
    ``eval_layer``) in bfloat16 vs float32 (mean, 5th percentile, min), the top-1 agreement and the largest logit
    difference;
  gradients: on a training batch, the relative L2 error and cosine of the matched student's loss gradient in
    bfloat16 vs float32, for each loss term alone and for the whole loss (teacher and student both in the dtype, as
    ``compute_dtype`` trains them);
  passes: each measurement against its threshold (``THRESHOLDS``).

    python -m benchmarks.mixed_precision --sweep runs/bf16

compares whole training runs instead: a sweep with the grid axis ``compute_dtype=float32,bfloat16``
(``experiments.sweep``), bfloat16 minus float32 paired by seed for every model and metric (mean, 95% t interval,
seeds with a positive / negative difference), as JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attrjax import data as attr_data
from attrjax.attribution._methods import class_maps
from attrjax.metrics import map_cosine
from attrjax.metrics._statistics import paired_difference
from attrjax.training import LossTerm, make_loss_fn
from benchmarks import common as bench_common
from experiments import configuration, datasets, models, runs
from experiments.distill import student_runs

# The bar for bfloat16 by default: maps that agree with float32 far better than two seeds of one run agree with
# each other (the demo's students: cosine ~0.9 to the teacher), predictions that do not change, and matching
# gradients that point the same way.
THRESHOLDS = {"map_cosine_p5": 0.98, "top1_agreement": 0.99, "gradient_cosine": 0.95}
SWEEP_METRICS = ("sample_map", "f1", "pointing_accuracy", "mean_auc", "map_cosine", "same_peak")
POINTS = ("compute_dtype=float32", "compute_dtype=bfloat16")


def compare_sweep(sweep_dir: str, method: str = "gradcam") -> dict:
    """bfloat16 minus float32, paired by seed, for every model and ``SWEEP_METRICS`` of a sweep over
    ``compute_dtype`` (its ``sweep.csv``)."""
    with open(os.path.join(sweep_dir, "sweep.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["method"] == method and row["status"] != "failed"]
    points = {row["point"] for row in rows}
    if not set(POINTS) <= points:
        raise ValueError(f"{sweep_dir} is no sweep over compute_dtype=float32,bfloat16 (its points: {sorted(points)})")
    value = {(row["point"], row["model"], int(row["seed"])): row for row in rows}
    seeds = sorted({seed for point, _, seed in value if point == POINTS[0]}
                   & {seed for point, _, seed in value if point == POINTS[1]})
    table = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        table[model] = {metric: paired_difference(
            [float(value[POINTS[1], model, seed][metric]) for seed in seeds],
            [float(value[POINTS[0], model, seed][metric]) for seed in seeds]) for metric in SWEEP_METRICS}
    return {"sweep": sweep_dir, "method": method, "seeds": seeds, "bfloat16_minus_float32": table}


def sweep_markdown(comparison: dict) -> str:
    lines = ["| model | " + " | ".join(SWEEP_METRICS) + " |", "|---" * (len(SWEEP_METRICS) + 1) + "|"]
    for model, metrics in comparison["bfloat16_minus_float32"].items():
        cells = [f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {d['positive']}/{d['negative']}"
                 for d in metrics.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _float32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def map_agreement(model_f32, model_bf16, variables, images: np.ndarray, masks: np.ndarray, layer: str,
                  batch_size: int) -> dict:
    """Grad-CAM of every present class, bfloat16 vs float32, over the images (N,S,S,3) with masks (N,S,S)."""
    maps_fn = jax.jit(lambda model, x: _float32(class_maps(model, variables, x, "gradcam", layer=layer)),
                      static_argnums=0)
    cosines, agree, logit_diff, excluded = [], [], 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = jnp.asarray(images[start:start + batch_size])
        (maps_a, logits_a), (maps_b, logits_b) = maps_fn(model_f32, batch), maps_fn(model_bf16, batch)
        present = attr_data.present_classes(masks[start:start + batch_size], logits_a.shape[-1])
        cosine = np.asarray(map_cosine(maps_b, maps_a))[present]
        cosines.append(cosine[~np.isnan(cosine)])
        excluded += int(np.isnan(cosine).sum())  # a map constant (all zero) in either dtype
        agree.append(np.asarray(jnp.argmax(logits_a, -1) == jnp.argmax(logits_b, -1)))
        logit_diff = max(logit_diff, float(jnp.max(jnp.abs(logits_a - logits_b))))
    cosines = np.concatenate(cosines)
    return {"pairs": int(cosines.size), "pairs_excluded": excluded, "map_cosine_mean": float(cosines.mean()),
            "map_cosine_p5": float(np.percentile(cosines, 5)), "map_cosine_min": float(cosines.min()),
            "top1_agreement": float(np.concatenate(agree).mean()), "max_logit_difference": logit_diff}


def gradient_agreement(pairs: dict, variables: dict, teacher_variables: dict, batch: dict,
                       terms: Sequence[LossTerm]) -> dict:
    """Relative error and cosine of the student's loss gradient, bfloat16 vs float32 (``pairs``: dtype ->
    (student, teacher)), for the loss of ``terms``."""
    gradients = {}
    for name, (student, teacher) in pairs.items():
        loss_fn = make_loss_fn(student, terms, teacher)
        grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, variables["batch_stats"], teacher_variables, b,
                                                        jax.random.key(0))[0]))
        leaves = jax.tree.leaves(grad_fn(variables["params"], batch))
        gradients[name] = np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])
    exact, rounded = gradients["float32"], gradients["bfloat16"]
    return {"relative_error": float(np.linalg.norm(rounded - exact) / np.linalg.norm(exact)),
            "cosine": float(exact @ rounded / (np.linalg.norm(exact) * np.linalg.norm(rounded)))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configuration.add_config_arguments(parser)
    parser.add_argument("--workdir", default="runs/demo", help="a work directory with a trained teacher and students")
    parser.add_argument("--images", type=int, default=200, help="localisation images for the maps")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--sweep", default=None, help="compare a sweep over compute_dtype instead (see above)")
    bench_common.add_output_flag(parser)
    args, overrides = configuration.parse_with_overrides(parser, argv)
    if args.sweep:
        comparison = compare_sweep(args.sweep)
        print(sweep_markdown(comparison))
        bench_common.emit(bench_common.round_floats(comparison), args.out)
        return comparison
    config = configuration.load_config(args.config, overrides)
    splits = datasets.load_splits(config, args.workdir)
    localization = splits["localization"]
    images = attr_data.normalize(localization["image"][:args.images], datasets.normalization(config))
    masks = localization["mask"][:args.images]

    def load(name, dtype):
        if name == runs.TEACHER:
            return runs.load_teacher(config, args.workdir, dtype=dtype)
        run = student_runs(config)[name]
        return runs.load_trained(name, run, models.compression_objective(config, run), config, args.workdir,
                                 dtype=dtype)

    names = [runs.TEACHER, *student_runs(config)]
    trained = {name: {dtype: load(name, getattr(jnp, dtype)) for dtype in ("float32", "bfloat16")} for name in names}
    result = {"workdir": args.workdir, "images": int(len(images)), "layer": config.eval_layer, "maps": {},
              "gradients": {}}
    for name, by_dtype in trained.items():
        variables = by_dtype["float32"][1]
        result["maps"][name] = map_agreement(by_dtype["float32"][0], by_dtype["bfloat16"][0], variables, images,
                                             masks, config.eval_layer, args.batch)
    batch = next(datasets.train_batches(splits["train"], config, 0))
    batch = {key: jnp.asarray(batch[key]) for key in ("image", "labels")}
    matched = next(name for name, run in student_runs(config).items() if run.objective.get("matching"))
    run = student_runs(config)[matched]
    pairs = {dtype: (trained[matched][dtype][0], trained[runs.TEACHER][dtype][0]) for dtype in ("float32", "bfloat16")}
    objective = models.compression_objective(config, run)
    for terms in ((term,) for term in objective.terms()):  # each term alone, then the whole loss
        result["gradients"][f"{matched}/{terms[0].name}"] = gradient_agreement(
            pairs, trained[matched]["float32"][1], trained[runs.TEACHER]["float32"][1], batch, terms)
    result["gradients"][f"{matched}/loss"] = gradient_agreement(
        pairs, trained[matched]["float32"][1], trained[runs.TEACHER]["float32"][1], batch, objective.terms())
    result["passes"] = {
        "map_cosine_p5": min(m["map_cosine_p5"] for m in result["maps"].values()) >= THRESHOLDS["map_cosine_p5"],
        "top1_agreement": min(m["top1_agreement"] for m in result["maps"].values()) >= THRESHOLDS["top1_agreement"],
        "gradient_cosine": min(g["cosine"] for g in result["gradients"].values()) >= THRESHOLDS["gradient_cosine"]}
    result["thresholds"] = THRESHOLDS
    bench_common.emit(bench_common.round_floats(result), args.out)
    return result


if __name__ == "__main__":
    main()
