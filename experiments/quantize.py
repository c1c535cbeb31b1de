"""Quantize the teacher, after training and during fine-tuning, with and without attribution matching
(docs/method.md#quantization).

    python -m experiments.quantize --config quick --workdir runs/demo [--config.quantization.bits=4]

Three runs, at ``config.quantization.bits`` (8 or 4; weights per output channel, every conv and dense layer's input
per tensor):
- ``quantized`` (post-training quantization): the teacher's weights, activation ranges calibrated on the first
  ``calibration_images`` training images; nothing is trained;
- ``qat`` (quantization-aware training): the quantized network fine-tuned from the teacher's weights for
  ``num_steps`` with the task loss, through straight-through quantizers (the ranges stay the calibrated ones);
- ``qat_match``: the same with + lambda * matching to the float teacher (eval mode, at ``config.matching_layer``);
  ``stochastic_drop_rate`` > 0 adds ``qat_match_stochastic``.
Each writes ``<run>/deployed.npz``: the integer network (``attrjax.quantization.DeployedModel``), with the SHA-256
of its arrays beside it. Every run's directory is bound to its settings (``quantized/run_config.json``;
``<run>/checkpoints/run_config.json`` for QAT) before any deployed network is written, so a rerun with other
settings is refused with every deployed network as it was (or, with ``--config.on_config_change=restart``, sets the
old directories aside). Needs ``experiments.train_teacher`` to have run in the same work directory.
"""

from __future__ import annotations

import itertools
import os
import time

import ml_collections

from attrjax import distributed
from attrjax.quantization import Quantization, QuantizedModel, calibrate, deploy
from attrjax.training import bind_run_config, check_run_config, make_optimizer, run_record
from experiments import datasets, models, runs, validation

PTQ = "quantized"


def quantization_runs(config, *, chosen: bool = True) -> dict[str, ml_collections.ConfigDict]:
    """Name -> ``{trained, objective}``: PTQ, QAT naive and matched (and stochastic when switched on). ``chosen``:
    only the runs ``config.runs`` names."""
    matched = dict(matching="weighted", matching_weight=config.quantization.matching_weight)
    table = {PTQ: dict(trained=False, objective={}), "qat": dict(trained=True, objective={}),
             "qat_match": dict(trained=True, objective=matched)}
    if config.stochastic_drop_rate:
        table["qat_match_stochastic"] = dict(trained=True,
                                             objective=dict(matched, drop_rate=config.stochastic_drop_rate))
    return validation.run_table(config, table, chosen=chosen)


def run_settings(config) -> dict:
    """The quantization settings a QAT run's directory is bound to (the objective is recorded by the trainer)."""
    return {"setting": "qat", **config.quantization.to_dict()}


def ptq_settings(config) -> dict:
    """The quantization settings the PTQ run's directory is bound to (``runs.run_config`` adds the seed, the data
    and the teacher's digest)."""
    settings = config.quantization
    return {"setting": "ptq", "bits": settings.bits, "calibration_images": settings.calibration_images}


def run_binding(name: str, run, config, workdir: str, teacher_variables: dict) -> tuple[str, dict]:
    """The directory that run ``name`` is bound to and its record: for PTQ the run's own directory (a restart sets
    its deployed network aside with it); for QAT its checkpoint directory, with the record that
    ``attrjax.training.train`` binds it to."""
    if not run.trained:
        return os.path.join(workdir, name), runs.run_config(name, ptq_settings(config), config, workdir,
                                                            with_teacher=True)
    settings = config.quantization
    return runs.checkpoint_dir(name, workdir), run_record(
        settings.num_steps, models.compression_objective(config, run), teacher_variables["params"],
        runs.run_config(name, run_settings(config), config, workdir, with_teacher=True))


def bind_runs(chosen: dict, config, workdir: str, teacher_variables: dict) -> None:
    """Binds the directory of every run in ``chosen`` (``run_binding``) before anything is written into any of them.

    Raises ``RunConfigMismatchError`` when one was written with other settings, unless ``config.on_config_change``
    is ``"restart"`` (then it is set aside)."""
    for name, quantization_run in chosen.items():
        directory, record = run_binding(name, quantization_run, config, workdir, teacher_variables)
        with distributed.primary_first(f"binding {directory} to its run record"):
            bind_run_config(directory, record, on_config_change=config.on_config_change)


def calibrated(config, train_split, teacher, teacher_variables: dict) -> QuantizedModel:
    """The quantized teacher, its ranges calibrated on the first ``calibration_images`` of the training stream
    (deterministic: the run's seed fixes the crops)."""
    settings = config.quantization
    batches = datasets.train_batches(train_split, config, start_step=0)
    count = -(-settings.calibration_images // config.data.batch_size)
    images = (batch["image"] for batch in itertools.islice(batches, count))
    return calibrate(teacher, teacher_variables, images, Quantization(settings.bits))


def load(name: str, run, config, workdir: str, quantized: QuantizedModel, teacher_variables: dict) -> dict:
    """The variables of a finished quantization run: the teacher's for PTQ, the fine-tuned ones for QAT.

    Raises FileNotFoundError when the run has not been made, ``RunConfigMismatchError`` when it was made with other
    settings."""
    if not run.trained:
        directory, record = run_binding(name, run, config, workdir, teacher_variables)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} holds no run of {name!r}; run experiments.quantize first")
        check_run_config(directory, record)
        return teacher_variables
    settings = config.quantization
    return runs.restore_finished(name, teacher_variables, make_optimizer(settings.optimizer, settings.num_steps),
                                 models.compression_objective(config, run), settings.num_steps, config, workdir,
                                 settings=run_settings(config), with_teacher=True)


def validate(config) -> None:
    """Raises for a bad quantization setting before the first run trains."""
    validation.check_config(config)
    settings = config.quantization
    if quantization_runs(config) and models.compute_dtype_name(config) != "float32":
        raise ValueError(f"quantization runs compute in float32 (calibration and fake quantization), but "
                         f"compute_dtype is {config.compute_dtype!r} (here {models.compute_dtype_name(config)}); set "
                         f"--config.compute_dtype=float32, or leave them out with --config.runs= (they are "
                         f"{', '.join(quantization_runs(config))})")
    try:
        Quantization(settings.bits)
        validation.check_count("quantization.calibration_images", settings.calibration_images)
        validation.check_count("quantization.num_steps", settings.num_steps)
        make_optimizer(settings.optimizer, settings.num_steps)
        for name, quantization_run in quantization_runs(config).items():
            models.compression_objective(config, quantization_run)
    except (ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"quantization settings: {error}") from error


def run(config, workdir: str, splits: dict | None = None) -> dict[str, float]:
    """Calibrates, fine-tunes (or resumes) every quantization run into ``workdir/<name>`` and writes its deployed
    network; returns the seconds spent per run.

    Every run's directory is bound first (``bind_runs``): a refused rerun leaves every deployed network as it was."""
    chosen = quantization_runs(config)
    if not chosen:
        return {}
    splits = datasets.load_splits(config, workdir) if splits is None else splits
    teacher, teacher_variables = runs.load_teacher(config, workdir)
    bind_runs(chosen, config, workdir, teacher_variables)
    started = time.perf_counter()
    quantized = calibrated(config, splits["train"], teacher, teacher_variables)
    print(f"[{PTQ}] {quantized.quantization.name}: activation ranges calibrated on "
          f"{config.quantization.calibration_images} training images in {time.perf_counter() - started:.1f} s")
    settings, seconds = config.quantization, {}
    for name, quantization_run in chosen.items():
        started = time.perf_counter()
        variables = teacher_variables
        if quantization_run.trained:
            variables = runs.fit(name, quantized, teacher_variables, settings.optimizer,
                                 models.compression_objective(config, quantization_run), settings.num_steps, config,
                                 workdir, splits["train"], settings=run_settings(config), teacher=teacher,
                                 teacher_variables=teacher_variables)
        deployed = deploy(quantized, variables)
        if distributed.is_primary():
            deployed.save(os.path.join(workdir, name, "deployed.npz"))
        seconds[name] = time.perf_counter() - started
    return seconds


def main():
    runs.main_for(run, __doc__, validate)


if __name__ == "__main__":
    main()
