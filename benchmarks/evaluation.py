"""Evaluation throughput by attribution method: every class of every image of a batch in one jit call, against a
per-image, per-class loop of the same computation.

    python -m benchmarks.evaluation [--model demo|paper|resnet] [--methods paper|all|NAME ...] [--batch N]
        [--out r.json]

For each method, two ways to compute the same evaluation maps (B,K,S,S) (the method's raw map, bilinearly
upsampled to the image and min-max normalised, docs/method.md#localisation-metrics), each jitted and compiled before
timing:
  batched: ``attrjax._evaluation.make_attribution_fn``, the call ``experiments/evaluate`` makes per batch (Grad-CAM:
           one vjp for all classes; the other methods: classes in groups of ``--class-chunk``, vmapped within a
           group, the forward pass shared; ``attrjax._chunking``);
  loop:    B*K calls of one function on one image and one class (the reference code's evaluation order).
Reported per method: images x classes per second of both, their ratio (``speedup``), compile times and the largest
difference between the two results (they agree up to float rounding, which RAP's normalisations amplify near zero
denominators; SmoothGrad draws different noise for a batch and for one image, so it is not compared). Timings are
round-robin within a method (``--rounds``), so ratios are robust to other load on the machine; absolute numbers are
not comparable across machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.attribution import weighted_collapse
from attrjax.attribution._methods import PER_CLASS_METHODS, resolve_methods
from attrjax._evaluation import evaluation_maps, make_attribution_fn
from attrjax.models import as_split_model, last_conv_layer, resnet_small, vgg
from benchmarks import common

PRESETS = {
    "demo": dict(arch="vgg", layout="vgg16_s3", width_divisor=4, image_size=64, num_classes=6, batch=16),
    "paper": dict(arch="vgg", layout="vgg16", width_divisor=1, image_size=227, num_classes=20, batch=2),
    # The demo's ResNet (experiments/configs/quick_resnet.py): basic blocks, the small stem, 64 px.
    "resnet": dict(arch="resnet", layout="resnet_small", width_divisor=1, image_size=64, num_classes=6, batch=16),
}
# Options that keep the sampling methods affordable on a CPU; override with --steps / --samples.
DEFAULT_OPTIONS = {"integrated_gradients": {"steps": 16}, "smooth_grad": {"samples": 8}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--methods", nargs="+", default=["all"],
                        help="method names, 'paper' (gradcam, lrp, rap, ebp) or 'all' (default)")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--layer", default=None, help="Grad-CAM / EBP layer (default: the last conv)")
    parser.add_argument("--class-chunk", type=int, default=8, help="classes attributed together (per-class methods)")
    parser.add_argument("--steps", type=int, default=None, help="integrated gradients' steps (default 16)")
    parser.add_argument("--samples", type=int, default=None, help="SmoothGrad's samples (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of (batched call, loop pass) per method")
    common.add_output_flag(parser)
    return parser.parse_args(argv)


def method_options(args: argparse.Namespace) -> dict:
    options = {method: dict(values) for method, values in DEFAULT_OPTIONS.items()}
    if args.steps:
        options["integrated_gradients"]["steps"] = args.steps
    if args.samples:
        options["smooth_grad"]["samples"] = args.samples
    return options


def one_pair_fn(model, layer: str, method: str, options: dict, num_classes: int):
    """``(variables, image (1,S,S,3), target (1,)) -> evaluation map (1,1,S,S)``: one image, one class."""

    def one_pair(variables, image, target):
        if method == "gradcam":
            lin = as_split_model(model, image).linearize(variables, image, layer)
            sensitivities = jnp.sum(lin.vjp(jax.nn.one_hot(target, num_classes)), axis=(1, 2))
            raw = weighted_collapse(lin.activations, sensitivities)
        else:
            raw = PER_CLASS_METHODS[method](model, variables, image, target, layer, **options)
        return evaluation_maps(raw[:, None], image.shape[1])

    return jax.jit(one_pair)


def time_method(model, variables, images, layer, method, options, num_classes, args) -> dict:
    batched = make_attribution_fn(model, layer, method, options, class_chunk=args.class_chunk)
    one_pair = one_pair_fn(model, layer, method, options, num_classes)
    single_images = [images[i:i + 1] for i in range(len(images))]
    targets = [jnp.asarray([k], jnp.int32) for k in range(num_classes)]

    def loop():
        return [[one_pair(variables, image, target) for target in targets] for image in single_images]

    _, batched_compile_s = common.compile_ahead(batched, variables, images)
    _, pair_compile_s = common.compile_ahead(one_pair, variables, single_images[0], targets[0])
    with common.count_compiles() as compiles_during_timing:
        times = common.interleaved_times({"batched": lambda: batched(variables, images), "loop": loop},
                                         rounds=args.rounds)
    pairs = len(images) * num_classes
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {
        "options": options,
        "batched_ms": 1e3 * seconds["batched"],
        "batched_pairs_per_s": pairs / seconds["batched"],
        "loop_pairs_per_s": pairs / seconds["loop"],
        "speedup": seconds["loop"] / seconds["batched"],
        "batched_compile_s": batched_compile_s,
        "pair_compile_s": pair_compile_s,
        "compiles_during_timing": compiles_during_timing[0],
        "max_abs_diff": max_abs_diff(batched(variables, images)[0], loop(), method),
    }


def max_abs_diff(batched_maps: jax.Array, loop_maps: list[list[jax.Array]], method: str) -> float | None:
    """Largest difference of the two (min-max normalised, so in [0, 1]) results; None for SmoothGrad, whose noise is
    drawn per call, so a batch and a single image get different draws."""
    if method == "smooth_grad":
        return None
    loop_maps = np.stack([np.concatenate([m[0] for m in row], 0) for row in jax.device_get(loop_maps)], 0)
    return float(np.abs(np.asarray(batched_maps) - loop_maps).max())


def run(args: argparse.Namespace) -> dict:
    preset = dict(PRESETS[args.model])
    batch = args.batch or preset["batch"]
    image_size = args.image_size or preset["image_size"]
    num_classes = preset["num_classes"]
    if preset["arch"] == "vgg":
        model = vgg(preset["layout"], num_classes=num_classes, image_size=image_size,
                    width_divisor=preset["width_divisor"])
    else:
        model = resnet_small(num_classes, width_divisor=preset["width_divisor"])
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3), np.float32))
    split = as_split_model(model, images)
    layer = args.layer or (last_conv_layer(model) if preset["arch"] == "vgg" else split.layers[-1])
    variables = split.init(jax.random.key(0), images)
    options = method_options(args)
    results = {}
    for method in resolve_methods(",".join(args.methods)):
        results[method] = time_method(model, variables, images, layer, method, options.get(method, {}), num_classes,
                                      args)
        timing = results[method]
        print(f"{method}: {timing['batched_pairs_per_s']:.1f} pairs/s batched, {timing['loop_pairs_per_s']:.1f} "
              f"looped, x{timing['speedup']:.1f}", file=sys.stderr, flush=True)
    return {
        "benchmark": "evaluation",
        "config": {"model": args.model, "layout": preset["layout"], "width_divisor": preset["width_divisor"],
                   "image_size": image_size, "num_classes": num_classes, "batch": batch, "layer": layer,
                   "class_chunk": args.class_chunk, "pairs_per_batch": batch * model.num_classes,
                   "rounds": args.rounds, **common.environment()},
        "methods": results,
    }


def main(argv=None):
    args = parse_args(argv)
    common.emit(common.round_floats(run(args)), args.out)


if __name__ == "__main__":
    main()
