"""Evaluate every trained model of a work directory: predictions (sample mAP, class mAP, F1) on val and attribution
localisation (pointing accuracy, mask AUC, agreement with the teacher's maps) on the localisation split, for every
method of ``config.eval.methods``; writes results.json, results.csv, results.md and figure.png (and methods.png when
several methods are evaluated).

    python -m experiments.evaluate --config quick --workdir runs/demo
    python -m experiments.evaluate --workdir runs/demo --config.eval.methods=all --config.eval.localization_images=100
    python -m experiments.evaluate --workdir runs/demo --config.eval.methods=gradcam,lrp \\
        --config.eval.faithfulness_steps=16

``eval.methods`` is a comma-separated list of ``attrjax.METHODS`` names, ``"paper"`` (Grad-CAM,
LRP, RAP, EBP) or ``"all"``; the first one fills the main table and figure. ``eval.localization_images`` (0 = all)
bounds the localisation images, ``eval.method_options`` passes options to a method (e.g. integrated gradients'
steps), and ``eval.faithfulness_steps`` > 0 adds deletion and insertion AUC (``evaluation.AttributionEvaluator``).
"""

from __future__ import annotations

import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from attrjax import data as attr_data
from attrjax import distributed
from attrjax.attribution._methods import resolve_methods
from attrjax._evaluation import AttributionEvaluator, ClassificationEvaluator
from attrjax._files import write_json
from attrjax._progress import Progress
from attrjax.pruning import count_params_and_flops, sparsity_summary, storage_bytes
from attrjax.quantization import QuantizedModel, deploy
from attrjax.training._metrics import CSV_NAME
from experiments import datasets, models, prune, quantize, runs, validation
from experiments.distill import student_runs
from experiments.figures import attribution_grid, method_grid

COLUMNS = [("params", "params", "{:,}"), ("mflops", "MFLOPs", "{:.1f}"), ("kbytes", "size (KB)", "{:.1f}"),
           ("conv_sparsity", "conv sparsity", "{:.3f}"),
           ("sample_map", "sample mAP", "{:.3f}"), ("class_map", "class mAP", "{:.3f}"),
           ("f1", "F1", "{:.3f}"), ("pointing_accuracy", "pointing acc.", "{:.3f}"), ("mean_auc", "mask AUC", "{:.3f}"),
           ("num_counted", "pairs", "{}"), ("map_cosine", "cos. to teacher", "{:.3f}"),
           ("same_peak", "same peak as teacher", "{:.3f}")]
LOCALIZATION_KEYS = ("pointing_accuracy", "mean_auc", "num_counted", "map_cosine", "same_peak")
# With eval.faithfulness_steps > 0: deletion / insertion AUC of each image's top class
# (attrjax.metrics.deletion_curve, insertion_curve).
AGREEMENT_COLUMNS = [("spearman", "Spearman to teacher", "{:.3f}"), ("top10_iou", "top-10% IoU with teacher", "{:.3f}")]
FAITHFULNESS_COLUMNS = [("deletion_auc", "deletion AUC (lower = better)", "{:.3f}"),
                        ("insertion_auc", "insertion AUC (higher = better)", "{:.3f}")]


def method_columns(results: dict) -> list[tuple[str, str, str]]:
    """The per-method columns: localisation, agreement with the teacher, and faithfulness when it was measured."""
    summary = next(iter(next(iter(results.values()))["methods"].values()))
    return ([column for column in COLUMNS if column[0] in LOCALIZATION_KEYS] + AGREEMENT_COLUMNS
            + [column for column in FAITHFULNESS_COLUMNS if column[0] in summary])


def first_images(arrays: dict, count: int) -> dict:
    return arrays if not count else {key: value[:count] for key, value in arrays.items()}


def deployed_bytes(model, variables) -> int:
    """The size a device stores (``attrjax.pruning.storage_bytes``): a quantized network's integer weights and
    scales, every other network's float arrays (a pruned one's sparse kernels in their sparse format)."""
    return storage_bytes(deploy(model, variables).variables if isinstance(model, QuantizedModel) else variables)


def classification_and_size(model, variables, splits, config) -> dict:
    row = dict(ClassificationEvaluator(model).run(variables, datasets.eval_batches(splits["val"], config)))
    size = count_params_and_flops(model, variables, models.example_images(config))
    row.update(params=size["params"], mflops=size["flops"] / 1e6, kbytes=deployed_bytes(model, variables) / 1e3,
               conv_sparsity=sparsity_summary(variables["params"])["sparsity"])
    return row


def localization_by_method(name, model, variables, arrays, methods, config, teacher_maps: dict,
                           evaluators: dict | None = None, progress: Progress | None = None):
    """``{method: summary}`` and ``{method: examples}`` of one model. The teacher is scored against its own maps
    (``reference="self"``: 1 where they are comparable, NaN for a broken teacher) and its raw maps are cached in
    ``teacher_maps`` (method -> per-batch maps) so each student is compared without recomputing them.
    ``evaluators`` caches one ``AttributionEvaluator`` per (architecture, method), so students of one architecture
    share its compiled functions."""
    summaries, examples, evaluators = {}, {}, {} if evaluators is None else evaluators
    for method in methods:
        started = time.perf_counter()
        is_teacher = name == "teacher"
        key = (model, method)
        if key not in evaluators:
            evaluators[key] = AttributionEvaluator(
                model, layer=config.eval_layer, method=method, method_options=config.eval.method_options.get(method),
                tolerance=config.eval.tolerance, faithfulness_steps=config.eval.faithfulness_steps,
                prediction_rule="top1" if config.data.labels == "single" else "positive_logit")
        summaries[method], examples[method] = evaluators[key].evaluate(
            variables, datasets.eval_batches(arrays, config), keep_maps=config.eval.figure_images,
            reference="self" if is_teacher else teacher_maps.get(method), keep_raw_maps=is_teacher)
        if is_teacher:
            teacher_maps[method] = examples[method].pop("raw_maps")
        summaries[method]["eval_s"] = time.perf_counter() - started
        count = f" ({progress.step()})" if progress is not None else ""
        print(f"evaluated {name} / {method} in {summaries[method]['eval_s']:.1f} s{count}")
    return summaries, examples


def last_training_step(directory: str) -> int:
    """The last step a run's ``metrics.csv`` logged (0 for a run that was not trained)."""
    path = os.path.join(directory, CSV_NAME)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((int(row["step"]) for row in csv.DictReader(f) if row["name"].startswith("train/")), default=0)


def write_evaluation_metrics(name: str, row: dict, workdir: str) -> None:
    """A model's evaluation numbers into its run's curves (``eval/<metric>``, ``eval/<method>/<metric>``), at its
    last training step."""
    directory = runs.metrics_dir(name, workdir)
    numbers = lambda summary: {key: value for key, value in summary.items()  # noqa: E731
                               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    scalars = {f"eval/{key}": value for key, value in numbers(row).items()}
    for method, summary in row["methods"].items():
        scalars.update({f"eval/{method}/{key}": value for key, value in numbers(summary).items()})
    with runs.metric_writer(directory) as writer:
        if writer is not None:  # process 0
            writer.write(last_training_step(directory), scalars)


def markdown_table(results: dict, method: str) -> str:
    lines = ["| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results.items():
        values = {**row, **row["methods"][method]}
        lines.append(f"| {name} | " + " | ".join(fmt.format(values[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def method_table(results: dict) -> str:
    columns = method_columns(results)
    lines = ["| model | method | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for name, row in results.items():
        for method, summary in row["methods"].items():
            lines.append(f"| {name} | {method} | "
                         + " | ".join(fmt.format(summary[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def write_csv(path: str, results: dict):
    """One row per (model, method): the model's classification and size columns and the method's localisation."""
    model_keys = [key for key, _, _ in COLUMNS if key not in LOCALIZATION_KEYS]
    method_keys = [key for key, _, _ in method_columns(results)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "method", *model_keys, *method_keys])
        for name, row in results.items():
            for method, summary in row["methods"].items():
                writer.writerow([name, method, *(row[k] for k in model_keys), *(summary[k] for k in method_keys)])


def trained_models(config, workdir: str, train_split):
    """Yields ``(name, model, variables)`` for the teacher, then every student, pruned and quantized network, each
    computing in float32 whatever it trained in."""
    teacher, teacher_variables = runs.load_teacher(config, workdir, dtype=jnp.float32)
    yield "teacher", teacher, teacher_variables
    for name, run_config in student_runs(config).items():
        objective = models.compression_objective(config, run_config)
        yield name, *runs.load_trained(name, run_config, objective, config, workdir, dtype=jnp.float32)
    for name, pruning_run in prune.pruning_runs(config).items():
        yield name, *prune.load(name, pruning_run, config, workdir, teacher, teacher_variables)
    quantization_runs = quantize.quantization_runs(config)
    if quantization_runs:
        quantized = quantize.calibrated(config, train_split, teacher, teacher_variables)
        for name, quantization_run in quantization_runs.items():
            yield name, quantized, quantize.load(name, quantization_run, config, workdir, quantized, teacher_variables)


def write_figures(workdir: str, examples: dict, methods: tuple, config) -> list[str]:
    """figure.png (images x models, first method) and, with several methods, methods.png (methods x models); none
    with ``eval.figure_images=0``. Returns the names written."""
    if not config.eval.figure_images:
        return []
    teacher = examples["teacher"][methods[0]]
    # Each figure row shows the present class that the teacher scores highest.
    present = attr_data.present_classes(teacher["mask"], config.data.num_classes)
    classes = np.argmax(np.where(present, teacher["logits"], -np.inf), axis=-1)
    display = dict(class_names=datasets.class_names(config, workdir), mean=datasets.normalization(config).mean,
                   std=datasets.normalization(config).std)
    attribution_grid(teacher["image"], teacher["mask"], classes,
                     {name: by_method[methods[0]]["maps"] for name, by_method in examples.items()},
                     os.path.join(workdir, "figure.png"), **display)
    if len(methods) == 1:
        return ["figure.png"]
    maps = {method: {name: by_method[method]["maps"][0] for name, by_method in examples.items()}
            for method in methods}
    method_grid(teacher["image"][0], teacher["mask"][0], int(classes[0]), maps, os.path.join(workdir, "methods.png"),
                **display)
    return ["figure.png", "methods.png"]


def validate(config) -> None:
    """Raises for a bad evaluation setting before any model is loaded (or, in the demo, trained)."""
    validation.check_config(config)
    validation.check_chosen_runs(config, [*student_runs(config, chosen=False),
                                          *prune.pruning_runs(config, chosen=False),
                                          *quantize.quantization_runs(config, chosen=False)])
    settings = config.eval
    resolve_methods(settings.methods)
    validation.check_count("eval.batch_size", settings.batch_size)
    if settings.batch_size % jax.local_device_count():
        raise ValueError(f"eval.batch_size {settings.batch_size} does not split over this process's "
                         f"{jax.local_device_count()} devices, which evaluate each batch together; make it a multiple "
                         f"of {jax.local_device_count()}")
    for key in ("localization_images", "figure_images", "faithfulness_steps"):
        validation.check_count(f"eval.{key}", settings[key], minimum=0)
    if isinstance(settings.tolerance, bool) or not isinstance(settings.tolerance, (int, float)) or not (
            0 <= settings.tolerance < float("inf")):
        raise ValueError(f"eval.tolerance must be a finite number of pixels >= 0, got {settings.tolerance!r}")
    for name, model_config in {"teacher": config.teacher, **student_runs(config)}.items():
        models.check_layer(f"{name!r} model (eval_layer)", models.build_model(model_config, config), config.eval_layer,
                           config)


def run(config, workdir: str, splits: dict | None = None) -> dict:
    splits = datasets.load_splits(config, workdir) if splits is None else splits
    methods = resolve_methods(config.eval.methods)
    localization = first_images(splits["localization"], config.eval.localization_images)
    print(f"evaluating {', '.join(methods)} on {len(localization['image'])} localisation images")
    results, examples, teacher_maps, evaluators = {}, {}, {}, {}
    num_models = (1 + len(student_runs(config)) + len(prune.pruning_runs(config))
                  + len(quantize.quantization_runs(config)))
    with Progress(num_models * len(methods), description="evaluated", unit="map set") as progress:
        for name, model, variables in trained_models(config, workdir, splits["train"]):
            results[name] = classification_and_size(model, variables, splits, config)
            results[name]["methods"], examples[name] = localization_by_method(
                name, model, variables, localization, methods, config, teacher_maps, evaluators, progress)
            write_evaluation_metrics(name, results[name], workdir)

    if distributed.is_primary():
        write_results(results, examples, methods, localization, config, workdir)
    return results


def write_results(results: dict, examples: dict, methods: tuple, localization: dict, config, workdir: str) -> None:
    """results.json, results.csv, results.md and the figures, with the main table printed."""
    table = markdown_table(results, methods[0])
    print("\n" + table + "\n")
    write_json(os.path.join(workdir, "results.json"), {"config": config.to_dict(), "results": results})
    write_csv(os.path.join(workdir, "results.csv"), results)
    text = (f"# attrjax results\n\nMain table: {methods[0]} (Grad-CAM and EBP at `{config.eval_layer}`), matching at "
            f"`{config.matching_layer}`. Pointing accuracy and mask AUC are over the (image, class) pairs of the "
            f"localisation split ({len(localization['image'])} images) whose class is present in the mask and "
            "predicted (logit > 0). Cosine, same peak, Spearman and top-10% IoU compare each model's map with the "
            "teacher's (same method) on every present pair where both maps are defined (pairs with a NaN or constant "
            "map are left out and counted in results.json as `<metric>_excluded`).\n\n" + table + "\n"
            "\nTraining curves and these numbers per run: `tensorboard --logdir "
            f"{os.path.abspath(workdir)}` (event files in `<run>/metrics/`, the same numbers in "
            "`<run>/metrics/metrics.csv`).\n")
    if config.eval.faithfulness_steps:
        text += ("\nDeletion / insertion AUC: each localisation image's top-scoring class, its map's pixels removed "
                 "from (inserted into) the zero (mean-colour) image in "
                 f"{config.eval.faithfulness_steps} equal steps, area under the class probability (RISE, Petsiuk et "
                 "al. 2018).\n")
    if len(methods) > 1 or config.eval.faithfulness_steps:
        text += "\n## Every method\n\n" + method_table(results) + "\n"
        print(method_table(results) + "\n")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    figures = write_figures(workdir, examples, methods, config)
    print(f"wrote {os.path.join(workdir, 'results.json')}, results.csv, results.md and "
          + (", ".join(figures) if figures else "no figures (eval.figure_images=0)"))


def main():
    runs.main_for(run, __doc__, validate)


if __name__ == "__main__":
    main()
