"""Speed of the jitted distillation train step (teacher forward + student forward/backward + matching loss).

    python -m benchmarks.train_step [--objective kd_match] [--steps 10] [--pytorch] [--out result.json]

Defaults are the paper's pair (docs/method.md#models-and-layers): full-width VGG16 teacher, VGG16/8 student, batch
16, 64 px, 20 classes, matched at conv4_3 (8x8 at 64 px; pool5 would be 2x2). Prints one JSON object: the step time,
XLA's FLOP count of one step, the achieved GFLOP/s and its fraction of this machine's measured fp32 matmul peak, the
compile time and the number of compilations (1 expected: compiled once, never retraced over the timed steps). The
2048^3 matmul is timed interleaved with the steps (one of each per round), so a change in machine load hits both
alike: ``matmul_peak_gflops`` is its best round, ``fraction_of_matmul_median`` compares medians. ``--pytorch``
adds a PyTorch transcription of the kd_match step (``benchmarks.torch_step``) to the same rounds, after checking
that it computes our loss and gradients (``pytorch_parity``): ``speedup_over_pytorch`` compares medians.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.models import VGG, init_variables, layer_spatial_size, vgg
from attrjax.pruning import count_params_and_flops
from attrjax.training._sharding import data_mesh, replicate, shard_batch
from attrjax.training._state import TrainState, sgd
from attrjax.training import Objective, jit_train_step, make_loss_fn, make_train_step
from benchmarks import common

STOCHASTIC_DROP_RATE = 0.3  # the paper preset's stochastic_drop_rate


def make_objective(kind: str, layer: str) -> Objective:
    """The four students of the paper's protocol (labels only, KD, KD + matching, KD + stochastic matching) and KD +
    LRP matching at the input (``PropagationMatching``)."""
    if kind == "task":
        return Objective()
    if kind == "kd":
        return Objective(kd="binary")
    matching = dict(kd="binary", matching="weighted", matching_weight=100.0, matching_layer=layer)
    if kind == "kd_match":
        return Objective(**matching)
    if kind == "kd_stochastic":
        return Objective(**matching, drop_rate=STOCHASTIC_DROP_RATE)
    if kind == "kd_lrp_match":
        return Objective(kd="binary", matching="lrp", matching_weight=100.0)
    raise ValueError(f"unknown objective {kind!r}")


def conv_forward_gflop(model: VGG, batch: int) -> float:
    """Forward GFLOPs of a batch by ``count_params_and_flops`` (2 per multiply-add, padded taps included): a
    cross-check of XLA's count, which skips the taps that fall on the zero padding (about 11% fewer at 64 px)."""
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    return batch * count_params_and_flops(model, variables, images)["flops"] / 1e9


def make_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The flags of this benchmark, which ``benchmarks.step_breakdown`` extends."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="vgg16", help="teacher layout (attrjax.models.VGG_LAYOUTS)")
    parser.add_argument("--teacher-divisor", type=int, default=1)
    parser.add_argument("--student", default="vgg16", help="student layout")
    parser.add_argument("--student-divisor", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--layer", default="conv4_3", help="matching layer (both networks)")
    parser.add_argument("--objective", choices=("task", "kd", "kd_match", "kd_stochastic", "kd_lrp_match"),
                        default="kd_match")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps (after 2 warm-up), each followed by one timed matmul")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul timed for the peak")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="what teacher and student compute in (parameters stay float32); the peak matmul too")
    parser.add_argument("--pytorch", action="store_true",
                        help="also time a PyTorch transcription of the step (benchmarks.torch_step, kd_match only) "
                             "interleaved with ours, and check that it computes the same loss and gradients")
    common.add_output_flag(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def pair_config(args: argparse.Namespace) -> dict:
    """The teacher/student/input part of a benchmark's JSON ``config``."""
    return {"teacher": args.teacher, "teacher_divisor": args.teacher_divisor, "student": args.student,
            "student_divisor": args.student_divisor, "batch": args.batch, "image_size": args.image_size,
            "num_classes": args.num_classes, "dtype": args.dtype}


def build_models(args: argparse.Namespace) -> tuple[VGG, VGG]:
    """(teacher, student) from the command line."""
    dtype = getattr(jnp, args.dtype)
    teacher = vgg(args.teacher, num_classes=args.num_classes, image_size=args.image_size,
                  width_divisor=args.teacher_divisor, dtype=dtype)
    student = vgg(args.student, num_classes=args.num_classes, image_size=args.image_size,
                  width_divisor=args.student_divisor, dtype=dtype)
    return teacher, student


def setup(args: argparse.Namespace, objective: Objective):
    """The jitted step and its mesh-placed arguments ``(state, teacher_variables, batch, rng)``."""
    teacher, student = build_models(args)
    tx = sgd(0.01)
    mesh = data_mesh()
    state = replicate(TrainState.create(init_variables(student, jax.random.key(1)), tx), mesh)
    teacher_variables = replicate(init_variables(teacher, jax.random.key(0)), mesh)
    rng_np = np.random.default_rng(0)
    batch = shard_batch({
        "image": rng_np.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32),
        "labels": (rng_np.random((args.batch, args.num_classes)) < 0.3).astype(np.float32),
    }, mesh)
    rng = jax.random.key(2)
    step = jit_train_step(make_train_step(student, tx, objective, teacher), mesh)
    return step, jax.block_until_ready((state, teacher_variables, batch, rng))


def pytorch_parity(args: argparse.Namespace, teacher_variables, student_variables, batch) -> dict:
    """Relative differences between attrjax's and the PyTorch transcription's loss and student kernel gradients on
    the same weights and batch, both networks without dropout (so that neither draws a mask)."""
    from benchmarks import torch_step

    teacher, student = (model.clone(dropout_rate=0.0) for model in build_models(args))
    objective = make_objective("kd_match", args.layer)
    loss_fn = make_loss_fn(student, objective, teacher)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        student_variables["params"], student_variables["batch_stats"], teacher_variables, batch, jax.random.key(0))
    torch_loss, torch_grads = torch_step.first_step_gradients(
        teacher, student, teacher_variables, student_variables, batch["image"], batch["labels"], layer=args.layer,
        matching_weight=objective.matching_weight)
    relative = {name: float(np.linalg.norm(torch_grads[name] - grads[name]["kernel"])
                            / np.linalg.norm(grads[name]["kernel"])) for name in torch_grads}
    return {"loss": float(loss), "pytorch_loss": torch_loss,
            "loss_relative_difference": abs(torch_loss / float(loss) - 1),
            "kernel_gradient_relative_difference_max": max(relative.values()),
            "worst_kernel": max(relative, key=relative.get)}


def run(args: argparse.Namespace) -> dict:
    teacher, student = build_models(args)
    objective = make_objective(args.objective, args.layer)
    if args.pytorch and args.objective != "kd_match":
        raise ValueError(f"--pytorch transcribes the kd_match step only, not {args.objective!r}")
    step, (state, teacher_variables, batch, rng) = setup(args, objective)
    calls, extra = {}, {}
    if args.pytorch:
        from benchmarks import torch_step

        host = jax.device_get((teacher_variables, state.variables, batch))
        extra["pytorch_parity"] = pytorch_parity(args, *host)
        calls["pytorch"], _ = torch_step.make_step(teacher, student, *host[:2], host[2]["image"], host[2]["labels"],
                                                   layer=args.layer, matching_weight=objective.matching_weight)
        extra["pytorch_threads"] = torch_step.torch.get_num_threads()
        extra["pytorch_version"] = torch_step.torch.__version__
    with common.count_compiles() as compiles_ahead:
        compiled, compile_s = common.compile_ahead(step, state, teacher_variables, batch, rng)
    gflop = common.xla_flops(compiled) / 1e9

    carry = {"state": state}

    def one_step():
        carry["state"], metrics = step(carry["state"], teacher_variables, batch, rng)
        return metrics

    matmul, matmul_flops = common.matmul_call(args.peak_size, getattr(jnp, args.dtype))
    with common.count_compiles() as compiles_running:
        times = common.interleaved_times({"step": one_step, **calls, "matmul": matmul}, rounds=args.steps, warmup=2)
    metrics = jax.device_get(one_step())

    step_s = statistics.median(times["step"])
    peak = matmul_flops / min(times["matmul"]) / 1e9
    matmul_median = matmul_flops / statistics.median(times["matmul"]) / 1e9
    achieved = gflop / step_s
    layer_size = layer_spatial_size(student, args.layer) if objective.matching else None
    if args.pytorch:
        pytorch_s = statistics.median(times["pytorch"])
        extra.update(pytorch_step_ms=1e3 * pytorch_s, speedup_over_pytorch=pytorch_s / step_s,
                     speedup_over_pytorch_per_round=statistics.median(
                         [p / s for p, s in zip(times["pytorch"], times["step"])]))
    return {
        "benchmark": "train_step",
        "config": {
            **pair_config(args), "objective": args.objective,
            "matching_layer": args.layer if objective.matching else None,
            "matching_map_size": layer_size, "drop_rate": objective.drop_rate, "steps": args.steps,
            **common.environment(),
        },
        "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times["step"]),
        "step_ms_max": 1e3 * max(times["step"]),
        "images_per_s": args.batch / step_s,
        "gflop_per_step": gflop,
        "teacher_forward_gflop": conv_forward_gflop(teacher, args.batch),
        "student_forward_gflop": conv_forward_gflop(student, args.batch),
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": achieved / peak,
        "fraction_of_matmul_median": achieved / matmul_median,
        "compile_s": compile_s,
        "num_compiles": compiles_ahead[0] + compiles_running[0],
        "compiles_during_steps": compiles_running[0],
        "jit_cache_size": step._cache_size(),
        "final_loss": float(metrics["loss"]),
        **extra,
    }


def main(argv=None):
    args = parse_args(argv)
    common.emit(common.round_floats(run(args)), args.out)


if __name__ == "__main__":
    main()
