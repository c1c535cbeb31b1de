"""Train state and the paper's optimizers: SGD + momentum + coupled weight decay, step schedules
(docs/method.md#optimisation-recipe)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; checkpointed as one pytree."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation) -> "TrainState":
        params = variables["params"]
        return cls(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                   batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate_schedule(base_lr: float, num_steps: int, *, kind: str = "constant", warmup_steps: int = 0,
                           boundaries: Sequence[int] = (), decay_factor: float = 0.1) -> optax.Schedule:
    """``constant``, ``step`` (x decay_factor at each step in ``boundaries``, the paper's lr_decay) or ``cosine``."""
    if kind == "constant":
        return optax.constant_schedule(base_lr)
    if kind == "step":
        return optax.piecewise_constant_schedule(base_lr, {int(b): decay_factor for b in boundaries})
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, base_lr, max(warmup_steps, 1), max(num_steps, warmup_steps + 1))
    raise ValueError(f"unknown learning-rate schedule {kind!r}; use 'constant', 'step' or 'cosine'")


def sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9,
        weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """PyTorch's SGD: coupled L2 (g <- g + wd * w) then heavy-ball momentum (dampening 0, no Nesterov)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum if momentum else None))


OPTIMIZER_FIELDS = {"sgd": ("learning_rate", "momentum", "weight_decay", "schedule"),
                    "adamw": ("learning_rate", "weight_decay", "schedule")}


def optimizer_schedule(config, num_steps: int) -> optax.Schedule:
    """The learning-rate schedule of an optimizer config (see ``make_optimizer``)."""
    return learning_rate_schedule(config.learning_rate, num_steps, kind=config.schedule,
                                  warmup_steps=config.get("warmup_steps", 0), boundaries=config.get("boundaries", ()),
                                  decay_factor=config.get("decay_factor", 0.1))


def make_optimizer(config, num_steps: int) -> optax.GradientTransformation:
    """Optimizer from a config with ``name`` (sgd|adamw), ``learning_rate``, ``momentum`` (sgd), ``weight_decay`` and
    schedule fields ``schedule``, ``warmup_steps``, ``boundaries`` (steps), ``decay_factor``."""
    name = config.get("name")
    if name not in OPTIMIZER_FIELDS:
        raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")
    missing = [field for field in OPTIMIZER_FIELDS[name] if field not in config]
    if missing:
        raise ValueError(f"the {name} optimizer config lacks {', '.join(missing)} (it needs "
                         f"{', '.join(OPTIMIZER_FIELDS[name])}); got {dict(config)}")
    for field in ("learning_rate", "weight_decay") + (("momentum",) if name == "sgd" else ()):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"optimizer {field} must be a finite number >= 0, got {value!r}")
    schedule = optimizer_schedule(config, num_steps)
    if name == "sgd":
        return sgd(schedule, momentum=config.momentum, weight_decay=config.weight_decay)
    return optax.adamw(schedule, weight_decay=config.weight_decay)
