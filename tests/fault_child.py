"""A tiny training run that the fault-injection tests start as a child process and kill at a chosen point (the runs
that are not killed call ``main`` in the test's own process).

    python tests/fault_child.py WORKDIR NUM_STEPS [step|save|nan K]

``step K``: the process SIGKILLs itself before step K runs; ``save K``: in the middle of writing the checkpoint of
step K; ``nan K``: the learning rate is NaN at step K, so the run diverges there. A finished run writes
WORKDIR/final.npz.
"""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.test_train import MATCHED, _batches, _models  # noqa: E402

from attrjax.models import init_variables  # noqa: E402
from attrjax.training import sgd, train  # noqa: E402
from attrjax.training import RunOptions  # noqa: E402


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def main(workdir: str, num_steps: int, mode: str = "", kill_step: int = 0):
    batches, nan_step = _batches(), kill_step if mode == "nan" else -1

    def learning_rate(count):  # a schedule in every mode, so all runs share one optimizer-state layout
        return jnp.where(count + 1 == nan_step, jnp.nan, 0.05)  # optax's update ``count`` is step ``count + 1``

    if mode == "step":
        def batches(start_step):
            for step, batch in enumerate(_batches()(start_step), start_step + 1):
                if step == kill_step:
                    kill_self()
                yield batch
    elif mode == "save":
        # Dies when orbax, writing step K, gets to the manifest item: the step's folder is half written.
        original_save, original_item_save = ocp.CheckpointManager.save, ocp.JsonCheckpointHandler.async_save
        saving = []

        def save(manager, step, *args, **kwargs):
            saving.append(step)
            return original_save(manager, step, *args, **kwargs)

        async def item_save(handler, *args, **kwargs):
            if saving[-1] == kill_step:
                kill_self()
            return await original_item_save(handler, *args, **kwargs)

        ocp.CheckpointManager.save, ocp.JsonCheckpointHandler.async_save = save, item_save
    teacher, student = _models()
    state, _ = train(student, init_variables(student, jax.random.key(1)), sgd(learning_rate), MATCHED, batches,
                     num_steps, rng=jax.random.key(5), teacher=teacher,
                     teacher_variables=init_variables(teacher, jax.random.key(0)),
                     run=RunOptions(checkpoint_dir=os.path.join(workdir, "checkpoints"), checkpoint_every=2, log=print))
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get((state.params, state.batch_stats, state.opt_state)))[0]
    np.savez(os.path.join(workdir, "final.npz"), **{jax.tree_util.keystr(path): leaf for path, leaf in leaves})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4], *map(int, sys.argv[4:5]))
