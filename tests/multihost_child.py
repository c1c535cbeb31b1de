"""One process of a multi-process training run on 127.0.0.1, started by tests/test_multihost.py.

    python tests/multihost_child.py WORKDIR NUM_PROCESSES PROCESS_ID PORT DEVICES_PER_PROCESS NUM_STEPS [KILL_STEP]

Trains the KD + attribution-matching pair of tests/test_train.py on a mesh of NUM_PROCESSES x DEVICES_PER_PROCESS
CPU devices, each process feeding its rows of every global batch, checkpointing every 2 steps. With KILL_STEP the
process SIGKILLs itself before that step runs. Process 0 of a finished run writes WORKDIR/final.npz. The test's own
process runs ``main`` as the one-process, one-device reference.
"""

import os
import signal
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attrjax import distributed  # noqa: E402
from attrjax.data import SHAPES_NORMALIZATION, eval_batches  # noqa: E402
from attrjax._evaluation import AttributionEvaluator, ClassificationEvaluator  # noqa: E402
from attrjax._files import write_json  # noqa: E402
from attrjax.models import init_variables  # noqa: E402
from attrjax.training import data_mesh, process_rows, sgd, shard_batch, train  # noqa: E402
from attrjax.training._sharding import host_value  # noqa: E402
from attrjax.training import RunOptions  # noqa: E402
from tests.test_train import MATCHED, _batches, _models  # noqa: E402

BATCH_SIZE = 8


def probe_collectives():
    """The cross-process checks, each with a real disagreement or failure: every process prints what it saw."""
    try:
        distributed.check_same_everywhere("probe value", jax.process_index())
    except ValueError as error:
        print(f"check: {error}")
    try:
        with distributed.primary_first("probing"):
            if distributed.is_primary():
                raise KeyError("probe")
    except KeyError:
        print("primary_first: process 0 raised its own error")
    except RuntimeError as error:
        print(f"primary_first: {error}")
    print(f"gathered {distributed.gather_rows(np.full(2, jax.process_index())).tolist()}")


def evaluate(model, variables) -> dict:
    """mAP and Grad-CAM localisation on 11 masked images, each process evaluating its share."""
    rng = np.random.default_rng(7)
    split = {"image": rng.integers(0, 256, (11, 16, 16, 3), dtype=np.uint8),
             "labels": rng.random((11, 4)) > 0.5, "mask": rng.integers(0, 5, (11, 16, 16), dtype=np.uint8)}

    def batches():
        return eval_batches(split, 4, normalization=SHAPES_NORMALIZATION, shard=distributed.process_shard())

    report = dict(ClassificationEvaluator(model).run(variables, batches()))
    evaluator = AttributionEvaluator(model, layer="pool2", prediction_rule="positive_logit")
    report.update(evaluator.evaluate(variables, batches(), reference="self")[0])
    return report


def main(workdir: str, num_steps: int, kill_step: int = -1):
    """Trains and evaluates on every device of every process (started), writing to ``workdir``."""
    mesh = data_mesh()
    rows = process_rows(BATCH_SIZE, mesh)
    if jax.process_count() > 1:
        probe_collectives()
    try:
        shard_batch({"image": np.zeros((3, 16, 16, 3), np.float32)}, mesh)
    except ValueError as error:
        print(f"indivisible batch: {error}")

    def batches(start_step):
        for step, batch in enumerate(_batches(BATCH_SIZE)(start_step), start_step + 1):
            if step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            yield {key: value[rows] for key, value in batch.items()}

    teacher, student = _models()
    state, history = train(student, init_variables(student, jax.random.key(1)), sgd(0.05), MATCHED, batches,
                           num_steps, rng=jax.random.key(5), teacher=teacher,
                           teacher_variables=init_variables(teacher, jax.random.key(0)), mesh=mesh,
                           run=RunOptions(checkpoint_dir=os.path.join(workdir, "checkpoints"), checkpoint_every=2,
                                          log_every=1))
    print(f"process {jax.process_index()}: rows {rows.start}:{rows.stop} of {BATCH_SIZE}, {len(history)} log lines")
    teacher_variables = init_variables(teacher, jax.random.key(0))
    report = evaluate(teacher, teacher_variables)
    if distributed.is_primary():
        write_json(os.path.join(workdir, "eval.json"), report)
        leaves = jax.tree_util.tree_flatten_with_path(jax.tree.map(host_value, (state.params, state.batch_stats)))[0]
        np.savez(os.path.join(workdir, "final.npz"), **{jax.tree_util.keystr(path): leaf for path, leaf in leaves})


if __name__ == "__main__":
    workdir, num_processes, process_id, port, devices, num_steps, *kill = sys.argv[1:]
    # Before JAX starts its backend: the CPU devices of this process, and its place among the processes.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    if int(num_processes) > 1:
        distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id), timeout_s=60)
    main(workdir, int(num_steps), int(kill[0]) if kill else -1)
