"""`make demo`: build the synthetic dataset, train a teacher, distil students with and without attribution
matching, evaluate all of them, and write results.json, results.md and figure.png into the work directory.

    python -m experiments.demo --workdir runs/demo [--config quick] [--set stochastic_drop_rate=0.3]

Re-running resumes: finished models are restored from their checkpoints, not retrained.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from attrjax import data as attr_data
from attrjax.evaluation import classification_report, localization_report, predict
from attrjax.train import Objective
from experiments import common
from experiments.figures import attribution_grid


def student_runs(config) -> dict:
    """Name -> student config; ``stochastic_drop_rate`` > 0 adds the stochastic-matching student."""
    runs = dict(config.students)
    if config.stochastic_drop_rate:
        stochastic = dict(config.students["kd_match"])
        stochastic["objective"] = dict(stochastic["objective"], drop_rate=config.stochastic_drop_rate)
        runs["kd_match_stochastic"] = stochastic
    return {name: ml_collections.ConfigDict(run) for name, run in runs.items()}


def evaluate_model(model, variables, splits, config, *, keep_maps: int):
    started = time.perf_counter()
    logits, labels = predict(model, variables, common.eval_batches(splits["val"], config))
    report = classification_report(logits, labels)
    localization, examples = localization_report(model, variables,
                                                 common.eval_batches(splits["localization"], config),
                                                 layer=config.eval_layer, tolerance=config.eval.tolerance,
                                                 keep_maps=keep_maps)
    report.update(localization)
    report["params"] = int(sum(x.size for x in jax.tree.leaves(variables["params"])))
    report["eval_s"] = time.perf_counter() - started
    return report, examples


def markdown_table(results: dict) -> str:
    columns = [("params", "params", "{:,}"), ("sample_map", "sample mAP", "{:.3f}"), ("class_map", "class mAP",
               "{:.3f}"), ("f1", "F1", "{:.3f}"), ("pointing_accuracy", "pointing acc.", "{:.3f}"),
               ("mean_auc", "mask AUC", "{:.3f}"), ("num_counted", "pairs", "{}"), ("train_s", "train s", "{:.0f}")]
    lines = ["| model | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    print(f"attrjax demo: work directory {os.path.abspath(workdir)}")
    splits = common.load_splits(config, workdir)
    print(f"data: {', '.join(f'{k} {len(v['image'])}' for k, v in splits.items())} images of "
          f"{config.data.image_size} px, {config.data.num_classes} classes")

    results, figure_maps = {}, {}
    started = time.perf_counter()
    teacher, teacher_variables, _ = common.train_model("teacher", config.teacher, Objective(), config, workdir,
                                                       splits["train"])
    train_seconds = {"teacher": time.perf_counter() - started}
    results["teacher"], examples = evaluate_model(teacher, teacher_variables, splits, config,
                                                  keep_maps=config.eval.figure_images)
    figure_maps["teacher"] = examples["maps"]

    for name, run_config in student_runs(config).items():
        objective = Objective(matching_layer=config.matching_layer, **run_config.objective)
        started = time.perf_counter()
        student, variables, _ = common.train_model(name, run_config, objective, config, workdir, splits["train"],
                                                   teacher=teacher, teacher_variables=teacher_variables)
        train_seconds[name] = time.perf_counter() - started
        results[name], student_examples = evaluate_model(student, variables, splits, config,
                                                         keep_maps=config.eval.figure_images)
        figure_maps[name] = student_examples["maps"]
    for name, seconds in train_seconds.items():
        results[name]["train_s"] = seconds

    table = markdown_table(results)
    print("\n" + table + "\n")
    common.save_json(os.path.join(workdir, "results.json"), {"config": config.to_dict(), "results": results})
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# attrjax demo\n\nGrad-CAM at `{config.eval_layer}`, matching at `{config.matching_layer}`; "
                "pointing accuracy and mask AUC over (image, class) pairs whose class is present and predicted.\n\n"
                + table + "\n")
    # Each figure row shows the present class the teacher scores highest.
    classes = np.argmax(np.where(_present(examples["mask"], config), examples["logits"], -np.inf), axis=-1)
    attribution_grid(examples["image"], examples["mask"], classes, figure_maps, os.path.join(workdir, "figure.png"),
                     class_names=attr_data.CLASS_NAMES, mean=attr_data.SHAPES_NORMALIZATION.mean,
                     std=attr_data.SHAPES_NORMALIZATION.std)
    print(f"wrote {workdir}/results.json, results.md and figure.png")
    return results


def _present(masks: np.ndarray, config) -> np.ndarray:
    """(N,K) 1 where class k appears in the mask of image n."""
    return (masks[:, None] == np.arange(1, config.data.num_classes + 1)[None, :, None, None]).any(axis=(2, 3))


def main():
    args = common.arg_parser(__doc__.splitlines()[0]).parse_args()
    run(common.load_config(args.config, args.set), args.workdir)


if __name__ == "__main__":
    main()
