"""Evaluate every trained model of a work directory: predictions (sample mAP, class mAP, F1) on val and Grad-CAM
localisation (pointing accuracy, mask AUC) on the localisation split; writes results.json, results.md, figure.png.

    python -m experiments.evaluate --config quick --workdir runs/demo
"""

from __future__ import annotations

import os
import time

import numpy as np

from attrjax import data as attr_data
from attrjax.evaluation import classification_report, localization_report, predict
from attrjax.pruning import count_params_and_flops, sparsity_summary
from experiments import common, prune
from experiments.distill import student_runs
from experiments.figures import attribution_grid

COLUMNS = [("params", "params", "{:,}"), ("mflops", "MFLOPs", "{:.1f}"), ("conv_sparsity", "conv sparsity", "{:.3f}"),
           ("sample_map", "sample mAP", "{:.3f}"), ("class_map", "class mAP", "{:.3f}"),
           ("f1", "F1", "{:.3f}"), ("pointing_accuracy", "pointing acc.", "{:.3f}"), ("mean_auc", "mask AUC", "{:.3f}"),
           ("num_counted", "pairs", "{}"), ("map_cosine", "cos. to teacher", "{:.3f}"),
           ("same_peak", "same peak as teacher", "{:.3f}")]


def evaluate_model(model, variables, splits, config, *, keep_maps: int, teacher: tuple):
    """The row of one model, and the first ``keep_maps`` localisation images with their maps."""
    started = time.perf_counter()
    logits, labels = predict(model, variables, common.eval_batches(splits["val"], config))
    report = classification_report(logits, labels)
    localization, examples = localization_report(model, variables, common.eval_batches(splits["localization"], config),
                                                 layer=config.eval_layer, tolerance=config.eval.tolerance,
                                                 keep_maps=keep_maps, reference=teacher)
    report.update(localization)
    size = count_params_and_flops(model, variables["params"])
    report.update(params=size["params"], mflops=size["flops"] / 1e6,
                  conv_sparsity=sparsity_summary(variables["params"])["sparsity"])
    report["eval_s"] = time.perf_counter() - started
    return report, examples


def markdown_table(results: dict) -> str:
    lines = ["| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def present_classes(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,K) True where class k appears in the segmentation mask of image n."""
    return (masks[:, None] == np.arange(1, num_classes + 1)[None, :, None, None]).any(axis=(2, 3))


def trained_models(config, workdir: str):
    """Yields ``(name, model, variables)`` for the teacher, then every student and every pruned network."""
    teacher, teacher_variables = common.load_trained("teacher", config.teacher, config, workdir)
    yield "teacher", teacher, teacher_variables
    for name, run_config in student_runs(config).items():
        yield name, *common.load_trained(name, run_config, config, workdir)
    for name, pruning_run in prune.pruning_runs(config).items():
        yield name, *prune.load(name, pruning_run, config, workdir, teacher, teacher_variables)


def run(config, workdir: str, splits: dict | None = None) -> dict:
    splits = common.load_splits(config, workdir) if splits is None else splits
    results, figure_maps = {}, {}
    for name, model, variables in trained_models(config, workdir):
        if name == "teacher":
            teacher = (model, variables)
        results[name], examples = evaluate_model(model, variables, splits, config,
                                                 keep_maps=config.eval.figure_images, teacher=teacher)
        figure_maps[name] = examples["maps"]
        if name == "teacher":
            teacher_examples = examples
        print(f"evaluated {name} in {results[name]['eval_s']:.0f} s")

    table = markdown_table(results)
    print("\n" + table + "\n")
    common.save_json(os.path.join(workdir, "results.json"), {"config": config.to_dict(), "results": results})
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# attrjax results\n\nGrad-CAM at `{config.eval_layer}`, matching at `{config.matching_layer}`. "
                "Pointing accuracy and mask AUC are over the (image, class) pairs of the localisation split whose "
                "class is present in the mask and predicted (logit > 0). Cosine and same-peak compare each "
                "model's Grad-CAM with the teacher's on every present pair.\n\n" + table + "\n")
    # Each figure row shows the present class that the teacher scores highest.
    present = present_classes(teacher_examples["mask"], config.data.num_classes)
    classes = np.argmax(np.where(present, teacher_examples["logits"], -np.inf), axis=-1)
    attribution_grid(teacher_examples["image"], teacher_examples["mask"], classes, figure_maps,
                     os.path.join(workdir, "figure.png"), class_names=attr_data.CLASS_NAMES,
                     mean=attr_data.SHAPES_NORMALIZATION.mean, std=attr_data.SHAPES_NORMALIZATION.std)
    print(f"wrote {os.path.join(workdir, 'results.json')}, results.md and figure.png")
    return results


def main():
    common.main_for(run, __doc__)


if __name__ == "__main__":
    main()
