"""Grad-CAM for every class of a batch in one jit call vs a per-image, per-class loop of the same computation.

    python -m benchmarks.attribution [--model demo|paper] [--batch N] [--out result.json]

``demo``: vgg16_s3 / 2 at 64 px, 6 classes, Grad-CAM at its last conv (conv3_3, 16x16), batch 64.
``paper``: full-width VGG16 at 227 px, 20 classes, Grad-CAM at conv5_3 (14x14), batch 4.

Three ways to compute the same (B,K,H,W) maps from the same images, each jitted and compiled before timing:
  batched: one call: features of the batch, one head vjp, ``jax.vmap`` over the K one-hot cotangents
           (``grad_cam_all_classes``);
  loop:    B*K calls of a single-image, single-class function (features + ``grad_cam``), the naive per-pair
           evaluation;
  loop_shared_features: B calls of the features, then B*K calls of single-class ``grad_cam`` on them (a loop that
           already shares the forward pass between the classes of an image).
Speedups are images x classes per second of ``batched`` over the loops, all timed round-robin in one run (a loop pass
is blocked on once, at its end, so it keeps JAX's asynchronous dispatch). All three agree to ``max_abs_diff``.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.attribution import grad_cam, grad_cam_all_classes
from attrjax._evaluation import make_attribution_fn
from attrjax.models import VGG, init_variables, last_conv_layer, layer_spatial_size, vgg
from benchmarks import common

# "demo" is the teacher of experiments/configs/quick.py; "paper" the full VGG16 at the paper's 227 px.
PRESETS = {
    "demo": dict(layout="vgg16_s3", width_divisor=4, image_size=64, num_classes=6, batch=64),
    "paper": dict(layout="vgg16", width_divisor=1, image_size=227, num_classes=20, batch=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--layer", default=None, help="attribution layer (default: the last conv)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds; each times one batched call and one pass of each loop, interleaved")
    common.add_output_flag(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    preset = dict(PRESETS[args.model])
    batch = args.batch or preset["batch"]
    image_size = args.image_size or preset["image_size"]
    model = vgg(preset["layout"], num_classes=preset["num_classes"], image_size=image_size,
                width_divisor=preset["width_divisor"])
    layer = args.layer or last_conv_layer(model)
    num_classes = model.num_classes
    variables = init_variables(model, jax.random.key(0))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3), np.float32))

    def features(variables, images):
        return model.apply(variables, images, layer=layer, method=VGG.features)

    def head_of(variables):
        return lambda a: model.apply(variables, a, layer=layer, method=VGG.head)

    @jax.jit
    def batched(variables, images):
        maps, _ = grad_cam_all_classes(head_of(variables), features(variables, images))
        return maps  # (B,K,H,W)

    @jax.jit
    def one_pair(variables, image, target):
        return grad_cam(head_of(variables), features(variables, image), target)  # (1,H,W)

    features_jit = jax.jit(features)

    @jax.jit
    def one_class(variables, feats, target):
        return grad_cam(head_of(variables), feats, target)

    pairs = batch * num_classes
    single_images = [images[i:i + 1] for i in range(batch)]
    targets = [jnp.asarray([k], jnp.int32) for k in range(num_classes)]

    def loop():
        return [[one_pair(variables, image, target) for target in targets] for image in single_images]

    def loop_shared_features():
        out = []
        for image in single_images:
            feats = features_jit(variables, image)
            out.append([one_class(variables, feats, target) for target in targets])
        return out

    # The library's evaluation path (maps upsampled to the image and min-max normalised), for reference.
    attribute = make_attribution_fn(model, layer)

    with common.count_compiles() as compiles:
        _, batched_compile_s = common.compile_ahead(batched, variables, images)
        _, pair_compile_s = common.compile_ahead(one_pair, variables, single_images[0], targets[0])
        common.compile_ahead(one_class, variables, features_jit(variables, single_images[0]), targets[0])
        common.compile_ahead(attribute, variables, images)
    with common.count_compiles() as compiles_during_timing:
        times = common.interleaved_times({
            "batched": lambda: batched(variables, images),
            "loop": loop,
            "loop_shared_features": loop_shared_features,
            "evaluation_fn": lambda: attribute(variables, images),
        }, rounds=args.rounds)

    batched_maps = np.asarray(batched(variables, images))
    loop_maps = np.stack([np.concatenate(row, 0) for row in jax.device_get(loop())], 0)  # (B,K,H,W)
    shared_maps = np.stack([np.concatenate(row, 0) for row in jax.device_get(loop_shared_features())], 0)
    max_abs_diff = float(max(np.abs(batched_maps - loop_maps).max(), np.abs(batched_maps - shared_maps).max()))
    scale = float(np.abs(batched_maps).max())

    seconds = {name: statistics.median(t) for name, t in times.items()}
    batched_rate = pairs / seconds["batched"]
    loop_rate = pairs / seconds["loop"]
    shared_rate = pairs / seconds["loop_shared_features"]
    return {
        "benchmark": "attribution",
        "config": {
            "model": args.model, "layout": preset["layout"], "width_divisor": preset["width_divisor"],
            "image_size": image_size, "num_classes": num_classes, "batch": batch, "layer": layer,
            "map_size": layer_spatial_size(model, layer), "pairs_per_batch": pairs, **common.environment(),
        },
        "batched_ms": 1e3 * seconds["batched"],
        "batched_pairs_per_s": batched_rate,
        "loop_ms": 1e3 * seconds["loop"],
        "loop_pairs_per_s": loop_rate,
        "loop_shared_features_pairs_per_s": shared_rate,
        "speedup": batched_rate / loop_rate,
        "speedup_vs_shared_features_loop": batched_rate / shared_rate,
        "evaluation_fn_pairs_per_s": pairs / seconds["evaluation_fn"],
        "batched_compile_s": batched_compile_s,
        "pair_compile_s": pair_compile_s,
        "num_compiles": compiles[0],  # batched, one_pair, features, one_class, evaluation_fn
        "compiles_during_timing": compiles_during_timing[0],
        "max_abs_diff": max_abs_diff,
        "max_abs_map": scale,
    }


def main(argv=None):
    args = parse_args(argv)
    common.emit(common.round_floats(run(args)), args.out)


if __name__ == "__main__":
    main()
