"""Train state, the jit step (task + KD + matching), sharding, checkpoints and the loop."""

from attrjax.train.checkpoint import checkpoint_manager, restore_latest
from attrjax.train.loop import train
from attrjax.train.sharding import data_mesh, replicate, shard_batch
from attrjax.train.state import TrainState, learning_rate_schedule, make_optimizer, sgd
from attrjax.train.step import Objective, jit_train_step, make_loss_fn, make_train_step

__all__ = ["Objective", "TrainState", "checkpoint_manager", "data_mesh", "jit_train_step", "learning_rate_schedule",
           "make_loss_fn", "make_optimizer", "make_train_step", "replicate", "restore_latest", "sgd",
           "shard_batch", "train"]
