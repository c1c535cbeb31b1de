"""The benchmarks run and print the JSON fields the README promises (tiny settings; timings are not asserted)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.data.voc import build_voc
from benchmarks import attribution, evaluation, input_pipeline, step_breakdown, train_step
from tests import voc_fixture


def _run(main, argv, tmp_path, capsys):
    out = tmp_path / "result.json"
    main(argv + ["--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    return printed


TINY_PAIR = ["--teacher", "vgg11", "--teacher-divisor", "16", "--student", "vgg11", "--student-divisor", "64",
             "--image-size", "32", "--batch", "4", "--layer", "conv3_2", "--steps", "1", "--peak-size", "64"]


def test_train_step_benchmark(tmp_path, capsys):
    result = _run(train_step.main, TINY_PAIR, tmp_path, capsys)
    for key in ("step_ms", "images_per_s", "gflop_per_step", "achieved_gflops", "fraction_of_peak"):
        assert result[key] > 0, key
    assert result["num_compiles"] == 1 and result["compiles_during_steps"] == 0
    assert result["config"]["dtype"] == "float32" and np.isfinite(result["final_loss"])
    # --dtype reaches both networks (bfloat16 training itself: tests/test_train.py).
    teacher, student = train_step.build_models(train_step.parse_args(TINY_PAIR + ["--dtype", "bfloat16"]))
    assert teacher.dtype == student.dtype == jnp.bfloat16


def test_the_pytorch_transcription_computes_our_loss_and_gradients():
    """Only where PyTorch is installed (an optional benchmark dependency): the baseline --pytorch times must be the
    same computation as ours, or the speed-up it reports means nothing."""
    pytest.importorskip("torch")
    args = train_step.parse_args(TINY_PAIR + ["--pytorch"])
    _, (state, teacher_variables, batch, _) = train_step.setup(args, train_step.make_objective("kd_match", args.layer))
    parity = train_step.pytorch_parity(args, *jax.device_get((teacher_variables, state.variables, batch)))
    assert parity["loss_relative_difference"] < 1e-5, parity
    assert parity["kernel_gradient_relative_difference_max"] < 1e-3, parity


def test_attribution_benchmark(tmp_path, capsys):
    result = _run(attribution.main, ["--model", "demo", "--batch", "2", "--rounds", "1"], tmp_path, capsys)
    assert result["batched_pairs_per_s"] > 0 and result["loop_pairs_per_s"] > 0 and result["speedup"] > 0
    assert result["max_abs_diff"] <= 1e-5 * max(result["max_abs_map"], 1.0)


def test_step_breakdown_benchmark(tmp_path, capsys):
    result = _run(step_breakdown.main, TINY_PAIR + ["--objectives", "kd", "kd_match"], tmp_path, capsys)
    assert set(result["components"]) == {"kd", "kd_match", "teacher_forward", "teacher_targets"}
    assert all(component["ms"] > 0 for component in result["components"].values())
    assert {"ratio_kd_match_over_kd", "teacher_targets_share_of_kd_match"} <= result.keys()
    assert "ratio_kd_over_task" not in result  # task was not timed


def test_evaluation_benchmark_agrees_with_the_per_pair_loop(tmp_path, capsys):
    result = _run(evaluation.main, ["--model", "resnet", "--batch", "2", "--image-size", "32", "--rounds", "1",
                                    "--methods", "lrp", "integrated_gradients", "--steps", "2"],
                  tmp_path, capsys)
    assert set(result["methods"]) == {"lrp", "integrated_gradients"}
    assert result["methods"]["integrated_gradients"]["options"] == {"steps": 2}
    for method, timing in result["methods"].items():
        assert timing["batched_pairs_per_s"] > 0 and timing["loop_pairs_per_s"] > 0, method
        assert timing["compiles_during_timing"] == 0, method
        assert timing["max_abs_diff"] <= 1e-4, method  # maps are min-max normalised to [0, 1]


def test_input_pipeline_benchmark_on_synthetic_and_voc_images(tmp_path, capsys):
    tiny = ["--images", "4", "--batch", "2", "--image-size", "16", "--steps", "1", "--threads", "1", "2"]
    result = _run(input_pipeline.main, tiny + ["--workers", "0"], tmp_path, capsys)
    assert result["source"].startswith("synthetic") and result["mean_jpeg_kb"] > 1
    assert list(result["images_per_s"]) == ["workers=0,threads=1,memory", "workers=0,threads=2,memory"]
    assert result["ratio_to_first"]["workers=0,threads=1,memory"] == 1.0
    voc_fixture.write_voc_tree(tmp_path / "manual")
    build_voc(tmp_path / "data", manual_dir=tmp_path / "manual", configs=("main",))
    result = _run(input_pipeline.main, tiny + ["--workers", "1", "--voc-data-dir", str(tmp_path / "data")], tmp_path,
                  capsys)  # one grain worker process
    assert result["source"] == "voc2012 train" and all(rate > 0 for rate in result["images_per_s"].values())
    assert list(result["images_per_s"]) == [f"workers=1,threads={threads},{storage}" for threads in (1, 2)
                                            for storage in ("disk", "memory")]


def test_transformer_benchmark(tmp_path, capsys):
    from benchmarks import transformer

    result = _run(transformer.main, ["--model", "tiny", "--rounds", "1", "--methods", "gradcam", "rollout"], tmp_path,
                  capsys)  # AttnLRP and CP-LRP are timed in the single-map part either way
    for name in ("forward", "saliency", "attnlrp", "cp_lrp"):
        timing = result["single_map"][name]
        assert min(timing["ms"], timing["compile_s"], timing["gflop"], timing["mb_accessed"]) > 0, name
    for key in ("attnlrp_over_saliency", "cp_lrp_over_saliency", "saliency_over_forward", "attnlrp_over_forward"):
        assert result[key] > 0, key
    assert set(result["evaluation"]) == {"gradcam", "rollout"}
    for method, timing in result["evaluation"].items():
        assert timing["batched_ms"] > 0 and timing["pairs_per_s"] > 0 and timing["compile_s"] > 0, method
    assert result["config"]["gradcam_layer"] == "block0" and result["config"]["tokens"] == 16
    assert result["compiles_during_timing"] == 0 and result["all_finite"]
