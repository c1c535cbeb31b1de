"""One jit-compiled train step: task loss + KD + lambda * attribution matching.

The teacher is a frozen second apply function (eval mode, ``stop_gradient``); its variables are a step argument,
never constants baked into the compiled program and never part of the student's checkpoint. The student's
weighted collapsed map comes from a ``jax.vjp`` at its matching layer (``SplitModel.linearize``), so ``jax.grad`` of
the loss differentiates through the student's gradients (double backprop) with no extra ceremony. Any model goes:
the step takes split models, attrjax's VGG, or plain Flax linen classifiers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from attrjax import distill, matching
from attrjax.attribution import activation_collapse, sensitivities_from_vjp, top1_target, weighted_collapse
from attrjax.models import VGG, SplitModel, as_split_model, check_compatible
from attrjax.train.sharding import batch_sharding, replicated
from attrjax.train.state import TrainState

MATCHING_KINDS = ("weighted", "activation")  # the paper's 'swa' (ours) and 'ewa' (AT-like baseline)
KD_KINDS = ("binary", "softmax")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the student is trained on.

    Attributes:
      labels: ``multilabel`` (labels (B,K) multi-hot, soft-margin loss) or ``single`` (labels (B,) int or (B,K) one-hot,
        softmax CE).
      kd: None, ``binary`` (per-class Bernoulli KD) or ``softmax`` (Hinton KD); replaces the task loss.
      temperature, kd_alpha: KD's T and alpha.
      matching: None, ``weighted`` (weighted collapsed attribution matching) or ``activation`` (unweighted).
      matching_weight: lambda.
      matching_layer: the layer both networks are matched at (must have the same spatial size in both).
      drop_rate: stochastic matching: fraction of teacher channels dropped from its map each step (0 = off).
    """

    labels: str = "multilabel"
    kd: str | None = None
    temperature: float = 4.0
    kd_alpha: float = 0.9
    matching: str | None = None
    matching_weight: float = 0.0
    matching_layer: str = "pool5"
    drop_rate: float = 0.0

    def __post_init__(self):
        if self.labels not in ("multilabel", "single"):
            raise ValueError(f"labels must be 'multilabel' or 'single', got {self.labels!r}")
        if self.kd not in (None,) + KD_KINDS:
            raise ValueError(f"kd must be None or one of {KD_KINDS}, got {self.kd!r}")
        if self.matching not in (None,) + MATCHING_KINDS:
            raise ValueError(f"matching must be None or one of {MATCHING_KINDS}, got {self.matching!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {self.drop_rate}")
        if self.drop_rate and self.matching != "weighted":
            raise ValueError("stochastic matching (drop_rate > 0) needs matching='weighted'")
        if not self.matching_weight >= 0:  # also rejects NaN
            raise ValueError(f"matching_weight must be >= 0, got {self.matching_weight}")
        if self.kd is not None and not 0 < self.temperature < float("inf"):
            raise ValueError(f"the KD temperature must be a finite number > 0 (the paper's and Hinton's value is 4), "
                             f"got {self.temperature}")
        if self.kd is not None and not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha (the weight of the teacher's soft targets against the labels) must lie in "
                             f"[0, 1], got {self.kd_alpha}")

    @property
    def needs_teacher(self) -> bool:
        return self.kd is not None or self.matching is not None


def _task_loss(objective: Objective, student_logits, teacher_logits, labels):
    if objective.kd == "binary":
        return distill.binary_kd_loss(student_logits, teacher_logits, labels, temperature=objective.temperature,
                                      alpha=objective.kd_alpha)
    if objective.kd == "softmax":
        return distill.softmax_kd_loss(student_logits, teacher_logits, labels, temperature=objective.temperature,
                                       alpha=objective.kd_alpha)
    if objective.labels == "single":
        return distill.softmax_cross_entropy(student_logits, labels)
    return distill.multilabel_soft_margin_loss(student_logits, labels)


def _teacher_outputs(teacher: SplitModel, teacher_variables, images, objective: Objective, channel_key):
    """Teacher logits (B,K) and, when matching, its (B,H,W) map for its top-1 class; all constants."""
    teacher_variables = jax.lax.stop_gradient(teacher_variables)
    if not objective.matching:
        return teacher.apply(teacher_variables, images)[0], None
    lin = teacher.linearize(teacher_variables, images, objective.matching_layer)
    if objective.matching == "activation":
        return lin.logits, activation_collapse(lin.activations)
    alpha = sensitivities_from_vjp(lin.vjp, lin.logits, top1_target)
    if objective.drop_rate:
        alpha = alpha * matching.stochastic_channel_keep(channel_key, alpha.shape[-1], objective.drop_rate)
    return lin.logits, weighted_collapse(lin.activations, alpha)


def _check_pair(teacher_logits, student_logits, teacher_maps, student_maps, layer) -> None:
    """Shapes are static, so a mismatched pair fails here, when the step is first traced."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"the teacher predicts {teacher_logits.shape[-1]} classes but the student "
                         f"{student_logits.shape[-1]}; distillation needs the same class axis")
    if teacher_maps is not None and teacher_maps.shape != student_maps.shape:
        raise ValueError(f"maps at {layer!r} are {teacher_maps.shape[1:]} in the teacher but {student_maps.shape[1:]} "
                         "in the student: match at a layer where both have the same spatial size")


def make_loss_fn(student, objective: Objective, teacher=None) -> Callable:
    """``loss_fn(params, batch_stats, teacher_variables, batch, rng) -> (loss, (batch_stats, metrics))``.

    ``student`` and ``teacher``: split models (``attrjax.models.split``), attrjax's VGG, or any Flax linen
    classifier (wrapped by ``attrjax.models.as_split_model``); ``objective.matching_layer`` names a layer of both.
    """
    if objective.needs_teacher:
        if teacher is None:
            raise ValueError(f"objective {objective} needs a teacher: pass teacher= and teacher variables")
        if isinstance(teacher, VGG) and isinstance(student, VGG):  # fail before anything is traced
            check_compatible(teacher, student, [objective.matching_layer] if objective.matching else [])

    def loss_fn(params, batch_stats, teacher_variables, batch, rng):
        dropout_key, channel_key = jax.random.split(rng)
        images, labels = batch["image"], batch["labels"]
        student_model = as_split_model(student, images)
        teacher_logits = teacher_maps = None
        if objective.needs_teacher:
            teacher_logits, teacher_maps = _teacher_outputs(as_split_model(teacher, images), teacher_variables,
                                                            images, objective, channel_key)

        variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        student_maps = None
        if objective.matching:
            lin = student_model.linearize(variables, images, objective.matching_layer, train=True, rng=dropout_key)
            logits, state = lin.logits, lin.state
            if objective.matching == "weighted":
                # The student is attributed to the teacher's top-1 class, through its own (train-mode) head.
                target = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), teacher_logits.shape[-1])
                student_maps = weighted_collapse(lin.activations, sensitivities_from_vjp(lin.vjp, logits, target))
            else:
                student_maps = activation_collapse(lin.activations)
        else:
            logits, state = student_model.apply(variables, images, train=True, rng=dropout_key)
        if objective.needs_teacher:
            _check_pair(teacher_logits, logits, teacher_maps, student_maps, objective.matching_layer)

        task = _task_loss(objective, logits, teacher_logits, labels)
        match = (matching.matching_loss(teacher_maps, student_maps) if objective.matching
                 else jnp.zeros((), jnp.float32))
        loss = task + objective.matching_weight * match
        metrics = {"loss": loss, "task_loss": task, "matching_loss": match}
        if objective.needs_teacher:
            metrics["teacher_finite"] = all_finite((teacher_logits, teacher_maps))
        return loss, (state.get("batch_stats", {}), metrics)

    return loss_fn


def all_finite(tree) -> jax.Array:
    """() bool: whether every floating-point leaf of ``tree`` is free of NaN and inf (True for no such leaf)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(student, tx: optax.GradientTransformation, objective: Objective,
                    teacher=None) -> Callable:
    """``train_step(state, teacher_variables, batch, rng) -> (state, metrics)``, not yet jitted.

    ``metrics``: the loss terms (``loss``, ``task_loss``, ``matching_loss``) and () bool flags ``gradients_finite``,
    ``state_finite`` (the updated params, BatchNorm statistics and optimizer state) and, with a teacher,
    ``teacher_finite`` (its logits and maps).

    ``rng`` is the run's base key; the step folds in ``state.step`` so a resumed run draws the same randomness.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(student, objective, teacher), has_aux=True)

    def train_step(state: TrainState, teacher_variables, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        (_, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, teacher_variables, batch,
                                                     step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        # Scalars the loop reads at its checks to find the first step that went non-finite, and why.
        metrics = dict(metrics, gradients_finite=all_finite(grads),
                       state_finite=all_finite((params, batch_stats, opt_state)))
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """Compiles ``train_step`` once for ``mesh``: batch split over devices, state and teacher replicated, the old
    state's buffers donated."""
    repl, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(repl, repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))
