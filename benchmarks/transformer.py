"""Attribution on a Vision Transformer: the cost of one AttnLRP map against one saliency map, and the evaluation
throughput of the transformer methods.

    python -m benchmarks.transformer [--model vit_small|tiny] [--batch N] [--rounds R] [--out result.json]

``vit_small``: ``attrjax.models.vit_small`` (64 px, 8 px patches -> 8x8 tokens, width 128, depth 4, 4 heads, gap
pooling), 6 classes, batch 16. ``tiny``: the same architecture at 16 px, width 16, one block (for tests).

Two measurements on the same randomly initialised model and images, every function jitted and compiled ahead of
time (``compile_s``), timed round-robin (``--rounds``) so that other load on the machine hits all alike:

1. One map per image (the first class for all), batch B: ``forward`` (the logits), ``saliency``
   (``attrjax.attribution.saliency`` of ``attrjax.models.logits_fn``: one forward and one backward pass),
   ``attnlrp`` and ``cp_lrp`` (``attrjax.attribution.lrp`` with that composite). Reported: median ms, XLA's FLOP
   count and bytes accessed per call, and the ratios ``attnlrp_over_saliency`` and ``cp_lrp_over_saliency``
   (AttnLRP as published costs about one backward pass, so about the saliency map's time), plus each over
   ``forward``.
2. Evaluation maps of every class of the batch in one call (``--methods``; default ``gradcam`` at the last block,
   ``attnlrp``, ``rollout``, ``gradient_rollout``): ``attrjax._evaluation.make_attribution_fn``, the call
   ``benchmarks.evaluation`` times as ``batched`` (``class_maps``, then upsampling to the image and min-max
   normalisation). Reported: images x classes per second and ms per batch.

``compiles_during_timing`` counts XLA compilations while timing (0: nothing timed includes compilation);
``all_finite`` says every timed output was finite. Ratios are what to compare; absolute numbers depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.attribution import lrp, saliency
from attrjax._evaluation import make_attribution_fn
from attrjax.models import ViT, logits_fn, vit_layer_names, vit_small
from benchmarks import common

PRESETS = {
    "vit_small": dict(image_size=64, patch=8, width=128, depth=4, num_heads=4, mlp_dim=256, num_classes=6,
                      batch=16),
    "tiny": dict(image_size=16, patch=4, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=3, batch=2),
}
EVALUATION_METHODS = ("gradcam", "attnlrp", "cp_lrp", "rollout", "gradient_rollout", "saliency")
DEFAULT_EVALUATION_METHODS = ("gradcam", "attnlrp", "rollout", "gradient_rollout")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="vit_small")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: the preset's)")
    parser.add_argument("--methods", nargs="+", choices=EVALUATION_METHODS, default=list(DEFAULT_EVALUATION_METHODS),
                        help="methods whose evaluation throughput is timed")
    parser.add_argument("--class-chunk", type=int, default=8, help="classes attributed together (per-class methods)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each part, every function once a round")
    common.add_output_flag(parser)
    return parser.parse_args(argv)


def build_model(name: str) -> ViT:
    """The preset's ViT (gap pooling, exact GELU, as ``vit_small``)."""
    preset = PRESETS[name]
    if name == "vit_small":
        return vit_small(preset["num_classes"])
    sizes = {key: preset[key] for key in ("image_size", "patch", "width", "depth", "num_heads", "mlp_dim")}
    return ViT(num_classes=preset["num_classes"], pool="gap", **sizes)


def single_map_fns(model: ViT) -> dict:
    """Jitted ``(variables, images, target (B,)) -> array``: the logits, and one map per image of each method."""

    def forward(variables, images, target):
        return logits_fn(model, variables)(images)

    def saliency_map(variables, images, target):
        return saliency(logits_fn(model, variables), images, target)

    def attnlrp(variables, images, target):
        return lrp(model, variables, images, target, composite="attnlrp")

    def cp_lrp(variables, images, target):
        return lrp(model, variables, images, target, composite="cp_lrp")

    return {name: jax.jit(fn) for name, fn in
            (("forward", forward), ("saliency", saliency_map), ("attnlrp", attnlrp), ("cp_lrp", cp_lrp))}


def median_seconds(calls: dict, rounds: int) -> tuple[dict[str, float], int]:
    """Median seconds of each thunk of ``calls``, timed round-robin, and the XLA compilations while timing."""
    with common.count_compiles() as compiles:
        times = common.interleaved_times(calls, rounds=rounds)
    return {name: statistics.median(seconds) for name, seconds in times.items()}, compiles[0]


def xla_megabytes(compiled) -> float:
    """Megabytes one call of a compiled executable reads and writes, from XLA's cost analysis (NaN if none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("bytes accessed", float("nan"))) / 1e6


def all_finite(outputs) -> bool:
    return all(bool(jnp.all(jnp.isfinite(output))) for output in outputs)


def time_single_maps(model: ViT, variables: dict, images: jax.Array, rounds: int) -> tuple[dict, int, bool]:
    """Part 1, one map per image: each function's median ms, compile seconds, XLA GFLOPs and MB per call; the
    compilations while timing; whether every output is finite."""
    target = jnp.zeros((images.shape[0],), jnp.int32)
    fns = single_map_fns(model)
    compiled = {name: common.compile_ahead(fn, variables, images, target) for name, fn in fns.items()}
    seconds, compiles = median_seconds({name: (lambda fn=fn: fn(variables, images, target))
                                        for name, fn in fns.items()}, rounds)
    timings = {name: {"ms": 1e3 * seconds[name], "compile_s": compiled[name][1],
                      "gflop": common.xla_flops(compiled[name][0]) / 1e9,
                      "mb_accessed": xla_megabytes(compiled[name][0])} for name in fns}
    return timings, compiles, all_finite(fn(variables, images, target) for fn in fns.values())


def time_evaluation(model: ViT, variables: dict, images: jax.Array, methods, layer: str, class_chunk: int,
                    rounds: int) -> tuple[dict, int, bool]:
    """Part 2, every class of the batch per call (``make_attribution_fn``): each method's ms per batch, images x
    classes per second and compile seconds; the compilations while timing; whether every map is finite."""
    fns = {method: make_attribution_fn(model, layer, method, class_chunk=class_chunk) for method in methods}
    compile_s = {method: common.compile_ahead(fn, variables, images)[1] for method, fn in fns.items()}
    seconds, compiles = median_seconds({method: (lambda fn=fn: fn(variables, images)) for method, fn in fns.items()},
                                       rounds)
    pairs = images.shape[0] * model.num_classes
    timings = {method: {"batched_ms": 1e3 * seconds[method], "pairs_per_s": pairs / seconds[method],
                        "compile_s": compile_s[method]} for method in methods}
    return timings, compiles, all_finite(fn(variables, images)[0] for fn in fns.values())


def run(args: argparse.Namespace) -> dict:
    model = build_model(args.model)
    batch = args.batch or PRESETS[args.model]["batch"]
    layer = vit_layer_names(model)[-1]
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, model.image_size, model.image_size, 3),
                                                                   np.float32))
    variables = model.init(jax.random.key(0), images)
    single, single_compiles, single_finite = time_single_maps(model, variables, images, args.rounds)
    evaluation, evaluation_compiles, evaluation_finite = time_evaluation(model, variables, images, args.methods,
                                                                         layer, args.class_chunk, args.rounds)
    ms = {name: timing["ms"] for name, timing in single.items()}
    return {
        "benchmark": "transformer",
        "config": {"model": args.model, "image_size": model.image_size, "patch": model.patch, "width": model.width,
                   "depth": model.depth, "num_heads": model.num_heads, "mlp_dim": model.mlp_dim, "pool": model.pool,
                   "tokens": model.num_tokens, "num_classes": model.num_classes, "batch": batch, "gradcam_layer": layer,
                   "class_chunk": args.class_chunk, "rounds": args.rounds,
                   "parameters": sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables)),
                   **common.environment()},
        "single_map": single,
        "attnlrp_over_saliency": ms["attnlrp"] / ms["saliency"],
        "cp_lrp_over_saliency": ms["cp_lrp"] / ms["saliency"],
        "saliency_over_forward": ms["saliency"] / ms["forward"],
        "attnlrp_over_forward": ms["attnlrp"] / ms["forward"],
        "evaluation": evaluation,
        "compiles_during_timing": single_compiles + evaluation_compiles,
        "all_finite": single_finite and evaluation_finite,
    }


def main(argv=None):
    args = parse_args(argv)
    common.emit(common.round_floats(run(args)), args.out)


if __name__ == "__main__":
    main()
