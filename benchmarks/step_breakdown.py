"""Where the train step's time goes: each objective's step and the teacher's share, timed interleaved in one run.

    python -m benchmarks.step_breakdown [--objectives kd kd_match] [train_step's flags, e.g. --teacher vgg16_s3 ...]

Components, each jitted and compiled before timing, then timed round-robin (``--steps`` rounds, one call of each
per round, plus one 2048^3 matmul for the peak) so that drift in machine load hits all of them alike:
  teacher_forward:  the teacher's eval-mode logits (what ``kd`` adds over ``task``);
  teacher_targets:  the teacher's logits and its top-1 Grad-CAM map at the matching layer (what ``kd_match``'s
                    teacher side costs);
  task, kd, kd_match, kd_stochastic, kd_lrp_match: full train steps (see ``benchmarks.train_step``), all of them
                    unless ``--objectives`` names some.
Prints one JSON object with per-component ms, XLA GFLOP and GFLOP/s, and the ratios between the components timed.
"""

from __future__ import annotations

import statistics

import jax

from attrjax.attribution import sensitivities_and_logits, top1_target, weighted_collapse
from attrjax.models import VGG
from benchmarks import common
from benchmarks.train_step import build_models, make_objective, make_parser, pair_config, setup

OBJECTIVES = ("task", "kd", "kd_match", "kd_stochastic", "kd_lrp_match")
# name: (numerator, denominator) component, reported when both were timed.
RATIOS = {
    "ratio_kd_match_over_kd": ("kd_match", "kd"),
    "ratio_kd_stochastic_over_kd_match": ("kd_stochastic", "kd_match"),
    "ratio_kd_lrp_match_over_kd_match": ("kd_lrp_match", "kd_match"),
    "ratio_kd_over_task": ("kd", "task"),
    "teacher_forward_share_of_kd": ("teacher_forward", "kd"),
    "teacher_targets_share_of_kd_match": ("teacher_targets", "kd_match"),
}


def _teacher_fns(teacher: VGG, layer: str):
    def forward(variables, images):
        return teacher.apply(variables, images)

    def targets(variables, images):
        feats = teacher.apply(variables, images, layer=layer, method=VGG.features)
        alpha, logits = sensitivities_and_logits(
            lambda a: teacher.apply(variables, a, layer=layer, method=VGG.head), feats, top1_target)
        return logits, weighted_collapse(feats, alpha)

    return jax.jit(forward), jax.jit(targets)


def run(args) -> dict:
    teacher, _ = build_models(args)
    calls, flops, compile_s = {}, {}, {}
    for kind in args.objectives:
        step, (state, teacher_variables, batch, rng) = setup(args, make_objective(kind, args.layer))
        compiled, compile_s[kind] = common.compile_ahead(step, state, teacher_variables, batch, rng)
        flops[kind] = common.xla_flops(compiled)
        carry = {"state": state}

        def call(step=step, carry=carry, teacher_variables=teacher_variables, batch=batch, rng=rng):
            carry["state"], metrics = step(carry["state"], teacher_variables, batch, rng)
            return metrics

        calls[kind] = call
    forward, targets = _teacher_fns(teacher, args.layer)
    for name, fn in (("teacher_forward", forward), ("teacher_targets", targets)):
        compiled, compile_s[name] = common.compile_ahead(fn, teacher_variables, batch["image"])
        flops[name] = common.xla_flops(compiled)
        calls[name] = lambda fn=fn: fn(teacher_variables, batch["image"])

    matmul, matmul_flops = common.matmul_call(args.peak_size, getattr(jax.numpy, args.dtype))
    with common.count_compiles() as compiles:
        times = common.interleaved_times({**calls, "matmul": matmul}, rounds=args.steps, warmup=2)

    peak = matmul_flops / min(times.pop("matmul")) / 1e9
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    gflops = {name: flops[name] / 1e6 / ms[name] for name in calls}
    components = {name: {"ms": ms[name], "gflop": flops[name] / 1e9, "gflops": gflops[name],
                         "fraction_of_peak": gflops[name] / peak, "compile_s": compile_s[name]} for name in calls}
    return {
        "benchmark": "step_breakdown",
        "config": {
            **pair_config(args), "matching_layer": args.layer, "rounds": args.steps, **common.environment(),
        },
        "components": components,
        "matmul_peak_gflops": peak,
        **{name: ms[top] / ms[bottom] for name, (top, bottom) in RATIOS.items() if {top, bottom} <= ms.keys()},
        **({"student_ms_in_kd_match": ms["kd_match"] - ms["teacher_targets"]} if "kd_match" in ms else {}),
        "compiles_during_timing": compiles[0],
    }


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                        help="the train steps to time (default: all)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.emit(common.round_floats(run(args)), args.out)


if __name__ == "__main__":
    main()
