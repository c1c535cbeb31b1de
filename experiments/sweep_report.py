"""The tables, statistics and figures of a sweep (``experiments.sweep``).

    python -m experiments.sweep_report --workdir runs/sweep     # rewrite the report of a finished sweep

Rows are tidy: one per (grid point, seed, model, attribution method) with every metric, plus one row per failed
run. Statistics (``attrjax.metrics.mean_interval``, ``paired_difference``): per point, model and method, the mean of
each metric over seeds with its 95% t interval; per compression setting, the paired difference matched - naive
(same seed, same teacher) with its interval, the paired t-test's p-value and the number of seeds on each side of
zero.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from attrjax._files import write_json  # noqa: E402
from attrjax.metrics._statistics import excludes_zero, mean_interval, paired_difference  # noqa: E402

# The metrics the report tabulates (results.json has more; the CSV keeps them all).
REPORTED = [("sample_map", "sample mAP"), ("f1", "F1"), ("pointing_accuracy", "pointing (predicted pairs)"),
            ("pointing_accuracy_all_present", "pointing (all present pairs)"), ("mean_auc", "mask AUC (predicted)"),
            ("mean_auc_all_present", "mask AUC (all present)"), ("map_cosine", "cosine to teacher"),
            ("same_peak", "same peak as teacher")]
DIFFERENCES = ["map_cosine", "pointing_accuracy", "pointing_accuracy_all_present", "mean_auc", "mean_auc_all_present",
               "sample_map", "f1"]
MODEL_KEYS = ("sample_map", "class_map", "f1", "params", "mflops", "conv_sparsity")


def setting_and_variant(model: str) -> tuple[str, str]:
    """``kd_match_stochastic`` -> ``("kd", "stochastic")``, ``kd_match`` -> ``("kd", "matched")``, ``kd`` ->
    ``("kd", "naive")``; the teacher is its own setting."""
    setting, matched, rest = model.partition("_match")
    if not matched:
        return setting, "teacher" if model == "teacher" else "naive"
    return setting, "stochastic" if rest == "_stochastic" else "matched"


def tidy_rows(outcomes: dict, points: dict[str, dict]) -> list[dict]:
    """Rows from ``{(point name, seed): run outcome}`` (``experiments.sweep.run_one``)."""
    rows = []
    for (name, seed), outcome in outcomes.items():
        base = {"point": name, **points[name], "seed": seed, "status": outcome["status"]}
        if outcome["status"] == "failed":
            rows.append({**base, "error": outcome["error"]})
            continue
        for model, result in outcome["results"].items():
            setting, variant = setting_and_variant(model)
            model_values = {key: result[key] for key in MODEL_KEYS if key in result}
            for method, summary in result["methods"].items():
                rows.append({**base, "model": model, "setting": setting, "variant": variant, "method": method,
                             **model_values, **{k: v for k, v in summary.items() if isinstance(v, (int, float))}})
    return rows


def failed_runs(rows: list[dict]) -> list[tuple[str, int]]:
    """``(point, seed)`` of every run that failed."""
    return [(row["point"], row["seed"]) for row in rows if row["status"] == "failed"]


def _value(row: dict | None, key: str) -> float:
    value = None if row is None else row.get(key)
    return math.nan if value is None else float(value)


def statistics(rows: list[dict]) -> dict:
    """``{"models": [...], "differences": [...]}``: intervals per (point, model, method, metric) and paired
    differences per (point, setting, variant, method, metric)."""
    seeds = sorted({row["seed"] for row in rows})
    scored = [row for row in rows if row["status"] != "failed"]
    index = {(row["point"], row["model"], row["method"], row["seed"]): row for row in scored}
    groups = list(dict.fromkeys((row["point"], row["model"], row["setting"], row["variant"], row["method"])
                                for row in scored))  # in the order the runs report them (teacher first)
    models, differences = [], []
    for point, model, setting, variant, method in groups:
        by_seed = [index.get((point, model, method, seed)) for seed in seeds]
        for metric, _ in REPORTED:
            models.append({"point": point, "model": model, "method": method, "metric": metric,
                           **mean_interval([_value(row, metric) for row in by_seed])})
        naive = [index.get((point, setting, method, seed)) for seed in seeds]
        if variant in ("matched", "stochastic") and any(naive):  # a sweep may have run the matched variant alone
            for metric in DIFFERENCES:
                difference = paired_difference([_value(row, metric) for row in by_seed],
                                               [_value(row, metric) for row in naive])
                differences.append({"point": point, "setting": setting, "variant": variant, "method": method,
                                    "metric": metric, **difference, "excludes_zero": excludes_zero(difference)})
    return {"seeds": seeds, "models": models, "differences": differences}


def _interval(entry: dict, asked: int, digits: int = 3) -> str:
    """``mean [low, high]``, with ``(n=k)`` where fewer than the ``asked`` seeds are behind it (failed runs,
    undefined values)."""
    if math.isnan(entry["mean"]):
        return f"n/a (n={entry['n']})"
    count = f" (n={entry['n']})" if entry["n"] < asked or math.isnan(entry["low"]) else ""
    if math.isnan(entry["low"]):
        return f"{entry['mean']:.{digits}f}{count}"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]{count}"


def model_table(stats: dict, point: str, method: str) -> str:
    entries = {(e["model"], e["metric"]): e for e in stats["models"] if e["point"] == point and e["method"] == method}
    models = list(dict.fromkeys(model for model, _ in entries))
    lines = ["| model | " + " | ".join(title for _, title in REPORTED) + " |", "|---" * (len(REPORTED) + 1) + "|"]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(_interval(entries[model, metric], len(stats["seeds"]))
                                                  for metric, _ in REPORTED) + " |")
    return "\n".join(lines)


def difference_table(stats: dict, point: str, method: str) -> str:
    entries = [e for e in stats["differences"] if e["point"] == point and e["method"] == method]
    if not entries:
        return "(no naive runs to compare with)"
    lines = ["| setting | variant - naive | metric | difference [95% CI] | seeds > 0 / < 0 | p "
             "| distinguishable from 0 |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        p_value = "n/a" if math.isnan(e["p_value"]) else f"{e['p_value']:.3f}"
        lines.append(f"| {e['setting']} | {e['variant']} | {e['metric']} | {_interval(e, len(stats['seeds']))} | "
                     f"{e['positive']} / {e['negative']} of {e['n']} | {p_value} | "
                     f"{'yes' if e['excludes_zero'] else 'no'} |")
    return "\n".join(lines)


SUMMARY = [("sample_map", "sample mAP"), ("f1", "F1"), ("pointing_accuracy", "pointing (predicted)"),
           ("pointing_accuracy_all_present", "pointing (all present)"),
           ("mean_auc_all_present", "mask AUC (all present)"), ("map_cosine", "cos. to teacher")]
SETTING_TITLES = {"kd": "distillation", "structured": "structured pruning", "unstructured": "unstructured pruning"}


def summary_table(stats: dict, point: str, method: str) -> str:
    """The main metrics of every model, ``mean [low, high]``."""
    entries = {(e["model"], e["metric"]): e for e in stats["models"] if e["point"] == point and e["method"] == method}
    models = list(dict.fromkeys(model for model, _ in entries))
    lines = ["| model | " + " | ".join(title for _, title in SUMMARY) + " |", "|---" * (len(SUMMARY) + 1) + "|"]
    lines += [f"| {model} | " + " | ".join(_interval(entries[model, key], len(stats["seeds"]), 2) for key, _ in SUMMARY)
              + " |" for model in models]
    return "\n".join(lines)


def summary_difference_table(stats: dict, point: str, method: str, variant: str = "matched") -> str:
    """Per setting, ``variant - naive`` of the main metrics: ``difference [low, high] k/n``, bold where the interval
    excludes zero."""
    entries = {(e["setting"], e["metric"]): e for e in stats["differences"]
               if e["point"] == point and e["method"] == method and e["variant"] == variant}
    settings = list(dict.fromkeys(setting for setting, _ in entries))
    if not settings:
        return "(no naive runs to compare with)"
    metrics = [(key, title) for key, title in SUMMARY if key in DIFFERENCES]
    lines = ["| setting | " + " | ".join(title for _, title in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for setting in settings:
        cells = []
        for key, _ in metrics:
            e = entries[setting, key]
            text = (f"{e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] {e['positive']}/{e['n']}"
                    if not math.isnan(e["low"]) else "n/a")
            cells.append(f"**{text}**" if e["excludes_zero"] else text)
        lines.append(f"| {SETTING_TITLES.get(setting, setting)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_figure(stats: dict, point: str, method: str, path: str) -> None:
    """Bars with 95% intervals per model for the cosine to the teacher, pointing (all present pairs) and sample mAP."""
    metrics = [("map_cosine", "cosine to teacher"), ("pointing_accuracy_all_present", "pointing (all present)"),
               ("sample_map", "sample mAP")]
    entries = {(e["model"], e["metric"]): e for e in stats["models"] if e["point"] == point and e["method"] == method}
    models = list(dict.fromkeys(model for model, _ in entries))
    asked = len(stats["seeds"])
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, (metric, title) in zip(axes, metrics):
        means = [entries[model, metric]["mean"] for model in models]
        errors = [[max(0.0, e["mean"] - e["low"]) if not math.isnan(e["low"]) else 0.0 for e in
                   (entries[model, metric] for model in models)],
                  [max(0.0, e["high"] - e["mean"]) if not math.isnan(e["high"]) else 0.0 for e in
                   (entries[model, metric] for model in models)]]
        colors = ["0.4" if m == "teacher" else ("tab:orange" if "_match" in m else "tab:blue") for m in models]
        ax.bar(range(len(models)), means, yerr=errors, capsize=3, color=colors)
        labels = [model + (f" (n={entries[model, metric]['n']})" if entries[model, metric]["n"] < asked else "")
                  for model in models]
        ax.set_xticks(range(len(models)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.05)
    figure.suptitle(f"{point}, {method}: mean over {asked} seeds (n where fewer), 95% intervals", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def tradeoff_figure(stats: dict, rows: list[dict], grid: dict, method: str, path: str) -> bool:
    """Sample mAP against the cosine to the teacher and pointing accuracy, one marker per grid value, for the
    matched models of a one-axis grid; False (nothing drawn) for other grids."""
    if len(grid) != 1:
        return False
    (key, values), = grid.items()
    points = {row["point"]: row[key] for row in rows if key in row}
    entries = {(e["point"], e["model"], e["metric"]): e for e in stats["models"] if e["method"] == method}
    models = sorted({model for _, model, _ in entries if "_match" in model})
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, metric, title in zip(axes, ("map_cosine", "pointing_accuracy_all_present"),
                                 ("cosine to teacher", "pointing (all present pairs)")):
        for model in models:
            xs, ys, xerr, yerr, labels = [], [], [], [], []
            for point, value in points.items():
                if (point, model, metric) not in entries:
                    continue
                x, y = entries[point, model, "sample_map"], entries[point, model, metric]
                xs.append(x["mean"])
                ys.append(y["mean"])
                xerr.append(0.0 if math.isnan(x["low"]) else x["mean"] - x["low"])
                yerr.append(0.0 if math.isnan(y["low"]) else y["mean"] - y["low"])
                labels.append(value)
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=model)
            for x, y, label in zip(xs, ys, labels):
                ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("sample mAP")
        ax.set_ylabel(title)
        ax.legend(fontsize=7)
    figure.suptitle(f"{key.split('.')[-1]} in {values} ({method}); 95% intervals over seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write(sweep_dir: str, rows: list[dict], *, grid: dict, command: str, log=print) -> dict:
    """sweep.csv, sweep.json, statistics.json, report.md and figures; returns the statistics."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(os.path.join(sweep_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    write_json(os.path.join(sweep_dir, "sweep.json"), {"grid": grid, "command": command, "rows": rows})
    stats = statistics(rows)
    write_json(os.path.join(sweep_dir, "statistics.json"), stats)
    failed = [row for row in rows if row["status"] == "failed"]
    runs = {(row["point"], row["seed"]) for row in rows}
    asked = len(stats["seeds"])
    text = [f"# Sweep: {asked} seeds" + (f", grid {grid}" if grid else "")
            + (f"; {len(failed)} of {len(runs)} runs failed" if failed else ""), "",
            f"Made by `{command}`. Means over seeds with 95% t intervals; differences are paired by seed (same "
            "teacher, same data order). A value behind fewer than the sweep's seeds (a failed run, an undefined "
            "metric) says how many with (n=k). Pointing and mask AUC are given on the paper's pair set (the pairs "
            "each model predicts) and on one pair set for all models (every present pair).", ""]
    if failed:
        text += [f"**{len(failed)} run(s) failed** (left out; see their log.txt):", ""]
        text += [f"- {row['point']} seed {row['seed']}: {row['error']}" for row in failed] + [""]
    scored = [row for row in rows if row["status"] != "failed"]
    methods = list(dict.fromkeys(row["method"] for row in scored))
    for point in dict.fromkeys(row["point"] for row in scored):
        finished = len({row["seed"] for row in scored if row["point"] == point})
        partial = ([f"**{finished} of {asked} seeds finished**: this point's statistics are over those.", ""]
                   if finished < asked else [])
        for method in methods:
            figure = f"bars_{point}_{method}.png".replace(",", "_").replace("=", "-")
            bar_figure(stats, point, method, os.path.join(sweep_dir, figure))
            text += [f"## {point}, {method}", "", *partial, summary_table(stats, point, method), "",
                     "Matched minus naive (difference [95% interval], seeds higher / seeds), bold where the interval "
                     "excludes zero:", "", summary_difference_table(stats, point, method), "",
                     "Every metric:", "", model_table(stats, point, method), "",
                     "Matched minus naive, paired by seed:", "", difference_table(stats, point, method), "",
                     f"![{point} {method}]({figure})", ""]
        example = os.path.join(point, f"seed{stats['seeds'][0]}", "figure.png")
        if os.path.exists(os.path.join(sweep_dir, example)):  # the first localisation images: not selected
            text += [f"Maps of the first localisation images (seed {stats['seeds'][0]}, not selected):", "",
                     f"![{point} maps]({example})", ""]
    if methods and tradeoff_figure(stats, scored, grid, methods[0], os.path.join(sweep_dir, "tradeoff.png")):
        text += ["## Trade-off", "", "![trade-off](tradeoff.png)", ""]
    with open(os.path.join(sweep_dir, "report.md"), "w") as f:
        f.write("\n".join(text))
    log(f"[sweep] wrote {sweep_dir}/sweep.csv, sweep.json, statistics.json and report.md")
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/sweep", help="the sweep directory")
    args = parser.parse_args(argv)
    path = os.path.join(args.workdir, "sweep.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist; run experiments.sweep first")
    with open(path) as f:
        saved = json.load(f)
    write(args.workdir, saved["rows"], grid=saved["grid"], command=saved["command"])


if __name__ == "__main__":
    main()
