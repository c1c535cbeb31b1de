"""One jit-compiled train step: task loss + KD + lambda * attribution matching (PAPER.md §2.7).

The teacher is a frozen second apply function (eval mode, ``stop_gradient``); its variables are a step argument,
never constants baked into the compiled program and never part of the student's checkpoint. The student's
weighted collapsed map comes from a ``jax.vjp`` of its own head, so ``jax.grad`` of the loss differentiates through
the student's gradients (double backprop) with no extra ceremony.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from attrjax import distill, matching
from attrjax.attribution import activation_collapse, sensitivities_and_logits, top1_target, weighted_collapse
from attrjax.models import VGG, check_compatible
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
      kd: None, ``binary`` (Bernoulli KD, PAPER.md §2.7a) or ``softmax`` (Hinton KD); replaces the task loss.
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


def _teacher_outputs(teacher: VGG, teacher_variables, images, objective: Objective, channel_key):
    """Teacher logits (B,K) and, when matching, its (B,H,W) map for its top-1 class; all constants."""
    teacher_variables = jax.lax.stop_gradient(teacher_variables)
    layer = objective.matching_layer if objective.matching else None  # KD alone: any split gives the logits
    feats = teacher.apply(teacher_variables, images, layer=layer, method=VGG.features)

    def head(a):
        return teacher.apply(teacher_variables, a, layer=layer, method=VGG.head)

    if objective.matching == "weighted":
        alpha, logits = sensitivities_and_logits(head, feats, top1_target)
        if objective.drop_rate:
            alpha = alpha * matching.stochastic_channel_keep(channel_key, alpha.shape[-1], objective.drop_rate)
        return logits, weighted_collapse(feats, alpha)
    logits = head(feats)
    maps = activation_collapse(feats) if objective.matching == "activation" else None
    return logits, maps


def make_loss_fn(student: VGG, objective: Objective, teacher: VGG | None = None) -> Callable:
    """``loss_fn(params, batch_stats, teacher_variables, batch, rng) -> (loss, (batch_stats, metrics))``."""
    if objective.needs_teacher:
        if teacher is None:
            raise ValueError(f"objective {objective} needs a teacher: pass teacher= and teacher variables")
        check_compatible(teacher, student, [objective.matching_layer] if objective.matching else [])
    layer = objective.matching_layer if objective.matching else None

    def loss_fn(params, batch_stats, teacher_variables, batch, rng):
        dropout_key, channel_key = jax.random.split(rng)
        images, labels = batch["image"], batch["labels"]
        if objective.needs_teacher:
            teacher_logits, teacher_maps = _teacher_outputs(teacher, teacher_variables, images, objective,
                                                            channel_key)
        else:
            teacher_logits = teacher_maps = None

        feats, updates = student.apply({"params": params, "batch_stats": batch_stats}, images, layer=layer,
                                       train=True, method=VGG.features, mutable=["batch_stats"])

        def head(a):
            logits, head_updates = student.apply({"params": params, "batch_stats": updates["batch_stats"]}, a,
                                                 layer=layer, train=True, method=VGG.head, mutable=["batch_stats"],
                                                 rngs={"dropout": dropout_key})
            return logits, head_updates["batch_stats"]

        if objective.matching == "weighted":
            # The student is attributed to the teacher's top-1 class, through its own (train-mode) head.
            target = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), teacher_logits.shape[-1])
            alpha, logits, new_batch_stats = sensitivities_and_logits(head, feats, target, has_aux=True)
            student_maps = weighted_collapse(feats, alpha)
        else:
            logits, new_batch_stats = head(feats)
            student_maps = activation_collapse(feats) if objective.matching == "activation" else None

        task = _task_loss(objective, logits, teacher_logits, labels)
        match = (matching.matching_loss(teacher_maps, student_maps) if objective.matching
                 else jnp.zeros((), jnp.float32))
        loss = task + objective.matching_weight * match
        metrics = {"loss": loss, "task_loss": task, "matching_loss": match}
        if objective.needs_teacher:
            metrics["teacher_finite"] = all_finite((teacher_logits, teacher_maps))
        return loss, (new_batch_stats, metrics)

    return loss_fn


def all_finite(tree) -> jax.Array:
    """() bool: whether every floating-point leaf of ``tree`` is free of NaN and inf (True for no such leaf)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(student: VGG, tx: optax.GradientTransformation, objective: Objective,
                    teacher: VGG | None = None) -> Callable:
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
