"""Prune the teacher and fine-tune it, with and without attribution matching (docs/method.md#structured-pruning,
#unstructured-pruning).

    python -m experiments.prune --config quick --workdir runs/demo [--config.stochastic_drop_rate=0.3]

Two settings, each naive (task loss) and matched (task loss + lambda * matching to the unpruned teacher, which is
always in eval mode: the reference code's unstructured scripts leave it in train mode,
docs/method.md#differences-from-the-reference-code):
- ``structured``: one-shot L1 filter pruning at ``config.pruning.structured.rates`` (one rate per conv), which
  returns a physically smaller VGG, then fine-tuning;
- ``unstructured``: ``rounds`` rounds of global magnitude pruning of the conv kernels to s_k = 1 - (1 - p)^k, each
  followed by ``steps_per_round`` fine-tuning steps with a fresh optimizer whose state carries the masks. The
  final weights of a round (not the best ones) carry over to the next, as in the paper.
Needs ``experiments.train_teacher`` to have run in the same work directory.
"""

from __future__ import annotations

import time

import ml_collections

from attrjax.models import VGG
from attrjax._progress import Progress
from attrjax.pruning import (apply_masks, iterative_sparsity, keep_pruned_at_zero, magnitude_masks, prune_filters,
                             prune_resnet_filters)
from attrjax.training import Objective, make_optimizer
from experiments import datasets, models, runs, validation

SETTINGS = ("structured", "unstructured")


def pruning_runs(config, *, chosen: bool = True) -> dict[str, ml_collections.ConfigDict]:
    """Name -> ``{setting, objective}``: every setting naive and matched (and stochastic when switched on).
    ``chosen``: only the runs ``config.runs`` names."""
    matched = dict(matching="weighted", matching_weight=config.pruning.matching_weight)
    table = {}
    for setting in SETTINGS:
        table[setting] = dict(setting=setting, objective={})
        table[f"{setting}_match"] = dict(setting=setting, objective=matched)
        if config.stochastic_drop_rate:
            table[f"{setting}_match_stochastic"] = dict(
                setting=setting, objective=dict(matched, drop_rate=config.stochastic_drop_rate))
    return validation.run_table(config, table, chosen=chosen)


def round_name(name: str, round_index: int) -> str:
    return f"{name}/round{round_index:02d}"


def run_settings(setting: str, config, round_index: int | None = None) -> dict:
    """The pruning settings a run's directory is bound to (the objective is recorded by the trainer)."""
    settings = {"setting": setting, **config.pruning[setting].to_dict()}
    return settings if round_index is None else dict(settings, round=round_index)


def structured_prune(teacher, teacher_variables: dict, settings) -> tuple:
    """The physically smaller network of ``config.pruning.structured``: VGG filter pruning at ``rates`` (one per
    conv), or ResNet pruning at ``rates`` (one rate, or one per block) with ``coupled`` residual streams."""
    if isinstance(teacher, VGG):
        return prune_filters(teacher, teacher_variables, settings.rates)
    return prune_resnet_filters(teacher, teacher_variables, settings.rates, coupled=settings.coupled)


def train_structured(name: str, objective: Objective, config, workdir: str, train_split, teacher,
                     teacher_variables: dict) -> tuple:
    settings = config.pruning.structured
    model, variables = structured_prune(teacher, teacher_variables, settings)
    return model, runs.fit(name, model, variables, settings.optimizer, objective, settings.num_steps, config,
                           workdir, train_split, settings=run_settings("structured", config), teacher=teacher,
                           teacher_variables=teacher_variables)


def train_unstructured(name: str, objective: Objective, config, workdir: str, train_split, teacher,
                       teacher_variables: dict) -> tuple:
    settings = config.pruning.unstructured
    variables = teacher_variables
    with Progress(settings.rounds, description=f"[{name}] round", unit="round") as progress:
        for k in range(1, settings.rounds + 1):
            sparsity = iterative_sparsity(settings.rate, k)
            masks = magnitude_masks(variables["params"], sparsity)
            variables = {"params": apply_masks(variables["params"], masks), "batch_stats": variables["batch_stats"]}
            print(f"[{name}] round {k}/{settings.rounds}: conv sparsity {sparsity:.4f}")
            variables = runs.fit(round_name(name, k), teacher, variables, settings.optimizer, objective,
                                 settings.steps_per_round, config, workdir, train_split,
                                 settings=run_settings("unstructured", config, k), teacher=teacher,
                                 teacher_variables=teacher_variables, masks=masks,
                                 step_offset=(k - 1) * settings.steps_per_round)
            print(f"[{name}] rounds done: {progress.step()}")
    return teacher, variables


def load(name: str, run, config, workdir: str, teacher, teacher_variables: dict) -> tuple:
    """The final model and variables of a finished pruning run (raises if it has not been trained)."""
    objective = models.compression_objective(config, run)
    if run.setting == "structured":
        settings = config.pruning.structured
        model, template = structured_prune(teacher, teacher_variables, settings)
        tx = make_optimizer(settings.optimizer, settings.num_steps)
        return model, runs.restore_finished(name, template, tx, objective, settings.num_steps, config, workdir,
                                            settings=run_settings("structured", config), with_teacher=True)
    settings = config.pruning.unstructured
    # No masks: the template's are derived from the teacher's params, and the restore replaces them with the run's.
    tx = keep_pruned_at_zero(make_optimizer(settings.optimizer, settings.steps_per_round))
    return teacher, runs.restore_finished(round_name(name, settings.rounds), teacher_variables, tx, objective,
                                          settings.steps_per_round, config, workdir,
                                          settings=run_settings("unstructured", config, settings.rounds),
                                          with_teacher=True)


def validate(config) -> None:
    """Raises for a bad setting of any pruning run before the first one trains: rates (by pruning a freshly
    initialised teacher of the configured architecture), step counts, rounds, optimizers and objectives."""
    validation.check_config(config)
    teacher = models.build_model(config.teacher, config)
    structured, unstructured = config.pruning.structured, config.pruning.unstructured
    for name, pruning_run in pruning_runs(config).items():
        try:
            models.compression_objective(config, pruning_run)
        except ValueError as error:
            raise ValueError(f"settings of the {name!r} run: {error}") from error
    try:
        validation.check_count("pruning.structured.num_steps", structured.num_steps)
        make_optimizer(structured.optimizer, structured.num_steps)
        if isinstance(teacher, VGG):  # (the ResNet pruner checks its rates itself)
            for rate in structured.rates:
                validation.check_fraction("pruning.structured.rates", rate)
        # The rates are checked against the architecture, not its values (a compiled init of a ResNet-50 at 227 px
        # took 10 s on 2 CPU cores, eagerly 17 s).
        structured_prune(teacher, models.variables_template(teacher, config), structured)
        validation.check_count("pruning.unstructured.rounds", unstructured.rounds)
        validation.check_count("pruning.unstructured.steps_per_round", unstructured.steps_per_round)
        validation.check_fraction("pruning.unstructured.rate", unstructured.rate)
        make_optimizer(unstructured.optimizer, unstructured.steps_per_round)
    except (ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"pruning settings: {error}") from error


def run(config, workdir: str, splits: dict | None = None) -> dict[str, float]:
    """Trains (or resumes) every pruning run into ``workdir/<name>``; returns the seconds spent per run."""
    splits = datasets.load_splits(config, workdir) if splits is None else splits
    teacher, teacher_variables = runs.load_teacher(config, workdir)
    train_setting = {"structured": train_structured, "unstructured": train_unstructured}
    seconds = {}
    for name, pruning_run in pruning_runs(config).items():
        objective = models.compression_objective(config, pruning_run)
        started = time.perf_counter()
        train_setting[pruning_run.setting](name, objective, config, workdir, splits["train"], teacher,
                                           teacher_variables)
        seconds[name] = time.perf_counter() - started
    return seconds


def main():
    runs.main_for(run, __doc__, validate)


if __name__ == "__main__":
    main()
