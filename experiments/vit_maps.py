"""Train a small Vision Transformer on the synthetic shapes and score every transformer attribution method on it:
sample mAP on the val split, pointing game and mask AUC per method on the localisation split, and a figure of the
maps (images x methods).

    python -m experiments.vit_maps --workdir runs/vit_maps [--steps N] [--images N] [--methods gradcam,rollout]
        [--evidence docs/evidence/vit_maps] [--figure docs/vit_methods.png]

The data, batches, task loss, optimizer and evaluators are the demo's (``experiments.configs.quick``); only the
model (a plain ``attrjax.models.ViT``, ``MODEL``), its schedule and the methods differ. The recipe (``MODEL``,
``OPTIMIZER``, ``BATCH_SIZE``, ``DEFAULT_STEPS``) was chosen by short probes listed in
docs/evidence/vit_maps/recipes.md. Nothing is checkpointed: a rerun trains again.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import numpy as np
import optax

from attrjax import data as attr_data
from attrjax.evaluation import AttributionEvaluator, ClassificationEvaluator
from attrjax._files import write_json
from attrjax.attribution import UnsupportedOp
from attrjax.models import ViT
from attrjax.training import RunOptions, make_optimizer, optimizer_schedule, train
from experiments import datasets, figures, models, runs
from experiments.configs import quick
from experiments.evaluate import first_images

RUN_NAME = "vit"
DEFAULT_STEPS = 1800  # about 5 minutes of training on 2 shared CPU cores
DEFAULT_IMAGES = 200
FIGURE_IMAGES = 4
# The plain ViT trained here (``attrjax.models.ViT`` arguments besides num_classes and image_size): vit_small's
# sizes with a class token, which learnt faster than vit_small's global average pooling in the probes
# (docs/evidence/vit_maps/recipes.md).
MODEL = dict(patch=8, width=128, depth=4, num_heads=4, mlp_dim=256, pool="token")
# Methods that attribute the input or the patch grid; they ignore the layer, which the evaluator still asks for.
INPUT_METHODS = ("attnlrp", "cp_lrp", "rollout", "gradient_rollout", "saliency", "integrated_gradients")
# AdamW with linear warm-up and cosine decay; ViTs trained from scratch want the warm-up and a stronger weight decay
# than the CNN teacher's, and clipping keeps the first steps of attention from blowing up. 1e-3 beat 5e-4, 2e-3 and
# 3e-3 in the probes; batch 32 matched batch 64 at equal images seen, so the steps go further.
OPTIMIZER = dict(name="adamw", learning_rate=1e-3, weight_decay=0.05, schedule="cosine", warmup_steps=100)
CLIP_NORM = 1.0
BATCH_SIZE = 32


def vit_config(steps: int, images: int, model: dict | None = None, optimizer: dict | None = None,
               batch_size: int = BATCH_SIZE, methods: str = ""):
    """The demo's quick preset (data, evaluation batch size) with this run's model, steps, batch size, optimizer,
    localisation images and methods (``selected_columns``' names); ``model`` and ``optimizer`` override entries of
    ``MODEL`` and ``OPTIMIZER``. The warm-up never exceeds the steps and the evaluation batch never exceeds the
    images, so a tiny run still decays its rate and computes no padding."""
    config = quick.get_config()
    schedule = dict(OPTIMIZER, **(optimizer or {}))
    schedule["warmup_steps"] = min(schedule["warmup_steps"], steps)
    config.vit = dict(num_steps=steps, model=dict(MODEL, **(model or {})), optimizer=schedule, clip_norm=CLIP_NORM,
                      methods=methods)
    config.data.batch_size = batch_size
    config.eval.localization_images = images
    config.eval.batch_size = min(config.eval.batch_size, images)
    config.eval.figure_images = min(FIGURE_IMAGES, images)
    return config


def make_vit(config) -> ViT:
    """The plain ViT of ``config.vit.model`` for the data's image size and classes."""
    return ViT(config.data.num_classes, image_size=config.data.image_size, **config.vit.model)


def method_columns(model: ViT) -> dict[str, tuple[str, str]]:
    """Column name -> (method, layer): Grad-CAM at the last two blocks whose patch tokens reach the head, read as the
    patch grid, then ``INPUT_METHODS``. With ``pool="token"`` the head reads only the class token after the last
    block, so that block's patch tokens get no gradient and Grad-CAM there is all zero: the two blocks before it
    are used."""
    last = model.depth - 1 - (model.pool == "token")
    blocks = [f"block{index}" for index in range(last, max(last - 2, -1), -1)]
    columns = {f"gradcam@{block}": ("gradcam", block) for block in blocks}
    return {**columns, **{method: (method, blocks[0]) for method in INPUT_METHODS}}


def selected_columns(model: ViT, names: str) -> dict[str, tuple[str, str]]:
    """``method_columns`` restricted to the comma-separated column or method names (all of them for "")."""
    columns = method_columns(model)
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    chosen = {column: entry for column, entry in columns.items() if not wanted or {column, entry[0]} & wanted}
    unknown = wanted - set(columns) - {method for method, _ in columns.values()}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; the columns are {list(columns)}")
    return chosen


def optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping, then the demo's optimizer factory (AdamW, warm-up + cosine) over ``num_steps``."""
    return optax.chain(optax.clip_by_global_norm(config.vit.clip_norm),
                       make_optimizer(config.vit.optimizer, config.vit.num_steps))


def train_vit(config, train_split) -> tuple[object, dict, float]:
    """Trains ``make_vit(config)`` on the task loss from a fresh initialisation; returns (model, variables,
    seconds)."""
    model = make_vit(config)
    init_key, step_key = runs.run_keys(RUN_NAME, config)
    # Compiled: op by op, the initialisers' draws took seconds, most of a tiny run's time.
    variables = jax.jit(model.init)(init_key, models.example_images(config))
    batches = functools.partial(datasets.train_batches, train_split, config)
    options = RunOptions(log_every=max(1, min(config.log_every, config.vit.num_steps)), name=RUN_NAME,
                         learning_rate=optimizer_schedule(config.vit.optimizer, config.vit.num_steps))
    started = time.perf_counter()
    state, _ = train(model, variables, optimizer(config), models.make_objective(config), batches,
                     config.vit.num_steps, rng=step_key, run=options)
    return model, jax.device_get(state.variables), time.perf_counter() - started


def prediction_rule(config) -> str:
    """Which (image, class) pairs count: the predicted ones, by the label kind's rule."""
    return "top1" if config.data.labels == "single" else "positive_logit"


def score_method(model, variables, arrays: dict, method: str, layer: str, config) -> tuple[dict, dict]:
    """One method's localisation summary (plus ``eval_s``) and its first figure images' maps; a method whose rules
    the model's ops refuse is recorded with its ``error`` instead of stopping the other methods."""
    started = time.perf_counter()
    evaluator = AttributionEvaluator(model, layer=layer, method=method, prediction_rule=prediction_rule(config),
                                     method_options=config.eval.method_options.get(method),
                                     tolerance=config.eval.tolerance)
    try:
        summary, examples = evaluator.evaluate(variables, datasets.eval_batches(arrays, config),
                                               keep_maps=config.eval.figure_images)
    except UnsupportedOp as error:
        return {"error": f"{type(error).__name__}: {error}"}, {}
    return {**summary, "eval_s": time.perf_counter() - started}, examples


def score_methods(model, variables, arrays: dict, config) -> tuple[dict, dict]:
    """``{column: summary}`` and ``{column: examples}`` over the config's methods (``selected_columns``), with a
    line per method as it finishes."""
    summaries, examples = {}, {}
    for column, (method, layer) in selected_columns(model, config.vit.methods).items():
        summaries[column], examples[column] = score_method(model, variables, arrays, method, layer, config)
        summary = summaries[column]
        print(f"[{column}] " + (summary["error"][:200] if "error" in summary else
                                f"pointing {summary['pointing_accuracy']:.3f}, mask AUC {summary['mean_auc']:.3f} "
                                f"({summary['num_counted']} pairs, {summary['eval_s']:.1f} s)"))
    return summaries, examples


def figure_classes(examples: dict, num_classes: int) -> np.ndarray:
    """Per figure row, the class present in the image's mask that the model scores highest."""
    present = attr_data.present_classes(examples["mask"], num_classes)
    return np.argmax(np.where(present, examples["logits"], -np.inf), axis=-1)


def method_figure(examples: dict, path: str, config, class_names) -> None:
    """Saves images (rows) x methods (columns): each method's upsampled, min-max normalised map of the row's class
    over the image, the class's mask outlined and the map's maximum circled (white inside the mask, red outside)."""
    drawn = {column: kept["maps"] for column, kept in examples.items() if kept}
    first = next(kept for kept in examples.values() if kept)
    norm = datasets.normalization(config)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figures.attribution_grid(first["image"], first["mask"], figure_classes(first, config.data.num_classes), drawn,
                             path, class_names=class_names, mean=norm.mean, std=norm.std,
                             title="ViT on the synthetic shapes")


def machine() -> dict:
    """The facts a timing needs beside it: CPU, cores, the backend and the versions."""
    return {"backend": jax.default_backend(), "devices": jax.device_count(), "jax": jax.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def model_description(model: dict) -> str:
    """``MODEL``'s entries in words, e.g. "patch 8, width 128, depth 4, 4 heads, MLP 256, gap pooling"."""
    return (f"patch {model['patch']}, width {model['width']}, depth {model['depth']}, {model['num_heads']} heads, "
            f"MLP {model['mlp_dim']}, {model['pool']} pooling")


def markdown(result: dict) -> str:
    """The evidence as Markdown: classification, training, the per-method table and how it was produced."""
    optimizer = result["recipe"]["optimizer"]
    lines = [
        "# A plain ViT on the synthetic shapes: attribution methods", "",
        f"Command: `{result['command']}`", "",
        f"Model: `attrjax.models.ViT` ({model_description(result['recipe']['model'])}; {result['params']:,} "
        f"parameters), trained {result['steps']} steps (batch {result['batch_size']}, AdamW lr "
        f"{optimizer['learning_rate']:g}, weight decay {optimizer['weight_decay']:g}, {optimizer['warmup_steps']} "
        f"warm-up steps + cosine, clipping at {result['recipe']['clip_norm']}) in {result['train_s']:.0f} s. "
        "How this recipe was chosen: [recipes.md](recipes.md).", "",
        f"Val split ({result['classification']['num_images']} images): sample mAP "
        f"{result['classification']['sample_map']:.3f}, class mAP {result['classification']['class_map']:.3f}, "
        f"F1 {result['classification']['f1']:.3f}.", "",
        f"Localisation split: the first {result['localization_images']} images; pointing and mask AUC over the "
        "(image, class) pairs whose class is in the mask and predicted (logit > 0); `pairs` counts them, so a "
        "weak model that predicts few classes is scored on few pairs. A failed method is left out of the figure "
        "(`docs/vit_methods.png`) and its error is in results.json.", "",
        *(["Grad-CAM is read at the two blocks before the last: with a class token the head reads only that token "
           "after the last block, so the last block's patch tokens get no gradient and its Grad-CAM is all zero.", ""]
          if result["recipe"]["model"]["pool"] == "token" else []),
        "| method | pointing acc. | mask AUC | pairs | eval s |", "|---|---|---|---|---|"]
    for column, summary in result["methods"].items():
        if "error" in summary:
            lines.append(f"| {column} | failed: {summary['error'].split(';')[0]} | | | |")
        else:
            lines.append(f"| {column} | {summary['pointing_accuracy']:.3f} | {summary['mean_auc']:.3f} | "
                         f"{summary['num_counted']} | {summary['eval_s']:.1f} |")
    facts = ", ".join(f"{key} {value}" for key, value in result["machine"].items())
    lines += ["", f"Machine: {facts}. Other processes shared the CPU, so the seconds are indicative.", ""]
    return "\n".join(lines)


def write_evidence(result: dict, directory: str) -> None:
    """results.json and results.md in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "results.json"), result)
    with open(os.path.join(directory, "results.md"), "w") as f:
        f.write(markdown(result))


def run(config, workdir: str, evidence: str, figure: str) -> dict:
    """Loads the data, trains, evaluates every method, and writes the evidence and the figure; returns the
    evidence's dict. ``config``: ``vit_config``'s."""
    steps, images = config.vit.num_steps, config.eval.localization_images
    splits = datasets.load_splits(config, workdir)
    model, variables, train_s = train_vit(config, splits["train"])
    classification = dict(ClassificationEvaluator(model).run(variables, datasets.eval_batches(splits["val"], config)))
    print(f"[{RUN_NAME}] val sample mAP {classification['sample_map']:.3f} after {steps} steps ({train_s:.0f} s)")
    localization = first_images(splits["localization"], images)
    summaries, examples = score_methods(model, variables, localization, config)
    result = {"command": " ".join(["python -m experiments.vit_maps", *sys.argv[1:]]), "steps": steps,
              "batch_size": config.data.batch_size, "params": int(sum(leaf.size for leaf in
                                                                      jax.tree.leaves(variables["params"]))),
              "recipe": config.vit.to_dict(), "train_s": train_s, "classification": classification,
              "localization_images": len(localization["image"]), "methods": summaries, "machine": machine()}
    write_evidence(result, evidence)
    method_figure(examples, figure, config, datasets.class_names(config, workdir))
    print(f"wrote {evidence}/results.json, results.md and {figure}")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="where the synthetic dataset is built (or found)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="localisation images to score")
    parser.add_argument("--methods", default="", help="comma-separated methods or columns to score (e.g. "
                        "gradcam,rollout,attnlrp); all of them by default")
    parser.add_argument("--evidence", default="docs/evidence/vit_maps", help="where results.json/.md go")
    parser.add_argument("--figure", default="docs/vit_methods.png", help="the images x methods figure")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # As the demo does: identical programs (every evaluator's scoring, reruns) compile once.
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    run(vit_config(args.steps, args.images, methods=args.methods), args.workdir, args.evidence, args.figure)


if __name__ == "__main__":
    main()
