"""`make demo`: build the synthetic dataset, train a teacher, compress it four ways (distillation, structured
filter pruning, iterative unstructured pruning, int8 quantization), each naive and with attribution matching,
evaluate every model, and write results.json, results.md and figure.png into the work directory.

    python -m experiments.demo --workdir runs/demo [--config quick] [--config.stochastic_drop_rate=0.3]

Re-running resumes: finished models are restored from their checkpoints, not retrained.
"""

from __future__ import annotations

import os
import time

from experiments import datasets, distill, evaluate, prune, quantize, runs, train_teacher


def validate(config) -> None:
    """Checks every run's settings, so a bad setting of a late run fails before the first one trains (the modules'
    ``run`` functions expect a validated config)."""
    for module in (train_teacher, distill, prune, quantize, evaluate):
        module.validate(config)


def run(config, workdir: str) -> dict:
    validate(config)
    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    print(f"attrjax demo: work directory {os.path.abspath(workdir)}")
    splits = datasets.load_splits(config, workdir)
    print("data: " + ", ".join(f"{name} {datasets.num_images(split)}" for name, split in splits.items())
          + f" images of {config.data.image_size} px, {config.data.num_classes} classes")
    seconds = {"teacher": train_teacher.run(config, workdir, splits)}
    seconds.update(distill.run(config, workdir, splits))
    seconds.update(prune.run(config, workdir, splits))
    seconds.update(quantize.run(config, workdir, splits))
    results = evaluate.run(config, workdir, splits)
    print("training seconds: " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items())
          + f"; demo total {time.perf_counter() - started:.0f} s")
    return results


def main():
    runs.main_for(run, __doc__)  # run validates every module's settings itself


if __name__ == "__main__":
    main()
