"""Train state, objectives as loss terms, the losses they compute (task, distillation, attribution matching), the
jit step, sharding, checkpoints, metric files and the loop."""

from attrjax import _deprecation
from attrjax._distill import binary_kd_loss, multilabel_soft_margin_loss, softmax_cross_entropy, softmax_kd_loss
from attrjax._matching import matching_loss, normalize_maps, stochastic_channel_keep
from attrjax.training._checkpoint import (CheckpointWriteError, CorruptCheckpointError, NonFiniteStateError,
                                      checkpoint_manager, restore_latest)
from attrjax.training._loop import RunOptions, run_record, train
from attrjax.training._metrics import MetricWriter, read_events
from attrjax.training._run_config import RunConfigMismatchError, bind_run_config, check_run_config, read_run_config
from attrjax.training._sharding import data_mesh, process_rows, replicate, shard_batch
from attrjax.training._state import TrainState, learning_rate_schedule, make_optimizer, optimizer_schedule, sgd
from attrjax.training._objective import (AttributionMatching, DistillationLoss, LossTerm, NetworkOutputs, Objective,
                                     PropagationMatching, TaskLoss, TermInputs, activation_map, gradcam_map)
from attrjax.training._step import jit_train_step, make_loss_fn, make_train_step

__all__ = ["AttributionMatching", "DistillationLoss", "LossTerm", "NetworkOutputs", "PropagationMatching", "TaskLoss",
           "TermInputs",
           "activation_map", "gradcam_map"]
__all__ += ["binary_kd_loss", "matching_loss", "multilabel_soft_margin_loss", "normalize_maps", "softmax_cross_entropy",
            "softmax_kd_loss", "stochastic_channel_keep"]
__all__ += ["CheckpointWriteError", "CorruptCheckpointError", "MetricWriter", "NonFiniteStateError", "Objective",
           "RunConfigMismatchError",
           "TrainState",
           "bind_run_config", "check_run_config", "checkpoint_manager", "data_mesh", "jit_train_step",
           "learning_rate_schedule", "make_loss_fn", "make_optimizer", "make_train_step", "optimizer_schedule",
           "process_rows", "read_events", "read_run_config",
           "replicate", "restore_latest", "RunOptions", "run_record", "sgd", "shard_batch", "train"]

# Exported by 0.1 and private since 0.2: the old paths warn until 0.3. The old submodules are stand-ins.
__getattr__ = _deprecation.package_getattr(__name__)
