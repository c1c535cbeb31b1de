"""One jit-compiled train step: the weighted sum of an objective's loss terms (task or KD + lambda * attribution
matching, or any loss terms of ``attrjax.training``).

The teacher is a frozen second apply function (eval mode, ``stop_gradient``); its variables are a step argument,
never constants baked into the compiled program and never part of the student's checkpoint. The student's
weighted collapsed map comes from a ``jax.vjp`` at its matching layers (``SplitModel.linearize_layers``), so
``jax.grad`` of the loss differentiates through the student's gradients (double backprop) with no extra ceremony.
Any model goes: the step takes split models, attrjax's VGG, or plain Flax linen and NNX classifiers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from attrjax.attribution import target_weights, top1_target
from attrjax.models import VGG, SplitModel, as_split_model, check_compatible
from attrjax.models._split import Variables
from attrjax.training._objective import LossTerm, NetworkOutputs, Objective, TermInputs, as_terms
from attrjax.training._sharding import batch_sharding, replicated
from attrjax.training._state import TrainState


def _float32(tree):
    """Floating leaves narrower than float32 (a bfloat16 network's outputs) as float32, before any loss, map or
    normalisation; float32 and float64 stay as they are."""
    def widen(x):
        narrow = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
        return x.astype(jnp.float32) if narrow else x
    return jax.tree.map(widen, tree)


def network_outputs(model: SplitModel, variables, images, layers: tuple[str, ...], target_fn, *, train: bool,
                    rng=None) -> tuple[NetworkOutputs, Variables]:
    """``(NetworkOutputs, updated state)`` of one forward pass, linearised at ``layers`` (none: a plain forward
    pass); the gradients are those of ``target_fn(logits) -> (B,K)`` weights.

    Logits, activations and gradients come out as at least float32 whatever the network computes in (a model built
    with ``dtype=jnp.bfloat16``), so every loss term, map and normalisation runs in float32 (float64 stays float64).
    """
    if not layers:
        logits, state = model.apply(variables, images, train=train, rng=rng)
        return NetworkOutputs(_float32(logits), {}, {}, None, model, variables), state
    lin = model.linearize_layers(variables, images, layers, train=train, rng=rng)

    def vjp(cotangent):  # float32 in and out; the network's backward pass runs in its own dtype
        return _float32(lin.vjp(cotangent.astype(lin.logits.dtype)))

    logits = _float32(lin.logits)
    gradients = vjp(jax.lax.stop_gradient(target_fn(logits)))
    return NetworkOutputs(logits, _float32(lin.activations), gradients, vjp, model, variables), lin.state


def _top1_weights(logits):
    return target_weights(top1_target, logits)


def make_loss_fn(student, objective: Objective | Sequence[LossTerm], teacher=None) -> Callable:
    """``loss_fn(params, batch_stats, teacher_variables, batch, rng) -> (loss, (batch_stats, metrics))``.

    ``student`` and ``teacher``: split models (``attrjax.models.SplitModel``), attrjax's VGG, or any Flax linen
    classifier (wrapped by ``attrjax.models.as_split_model``). ``objective``: an ``Objective`` or a sequence of loss
    terms (``attrjax.training.LossTerm``); the layers the terms name must be layers of both networks. ``loss`` is the
    weighted sum of the terms, and ``metrics`` holds it as ``loss`` and each term's value under its name.
    """
    terms = as_terms(objective)
    needs_teacher = any(term.needs_teacher for term in terms)
    layers = tuple(dict.fromkeys(layer for term in terms for layer in term.layers))
    if needs_teacher:
        if teacher is None:
            users = ", ".join(f"{term.name} ({type(term).__name__})" for term in terms if term.needs_teacher)
            raise ValueError(f"the loss terms {users} need a teacher: pass teacher= and teacher variables")
        if isinstance(teacher, VGG) and isinstance(student, VGG):  # fail before anything is traced
            check_compatible(teacher, student, layers)

    def loss_fn(params, batch_stats, teacher_variables, batch, rng):
        dropout_key, terms_key = jax.random.split(rng)
        images, labels = batch["image"], batch["labels"]
        teacher_outputs = None
        if needs_teacher:
            # Eval mode and constants: the teacher's logits, maps and gradients carry no gradient to the student.
            teacher_outputs, _ = network_outputs(as_split_model(teacher, images),
                                                 jax.lax.stop_gradient(teacher_variables), images, layers,
                                                 _top1_weights, train=False)
        # The student is attributed to the teacher's top-1 class (its own without a teacher), in train mode.
        teacher_top1 = None if teacher_outputs is None else _top1_weights(teacher_outputs.logits)
        target_fn = _top1_weights if teacher_top1 is None else lambda _: teacher_top1
        variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        student_outputs, state = network_outputs(as_split_model(student, images), variables, images, layers,
                                                 target_fn, train=True, rng=dropout_key)
        if teacher_outputs is not None and teacher_outputs.logits.shape != student_outputs.logits.shape:
            raise ValueError(f"the teacher predicts {teacher_outputs.logits.shape[-1]} classes but the student "
                             f"{student_outputs.logits.shape[-1]}; distillation needs the same class axis")

        values = {term.name: term(TermInputs(labels, images, student_outputs, teacher_outputs,
                                             jax.random.fold_in(terms_key, index)))
                  for index, term in enumerate(terms)}
        loss = sum(term.weight * values[term.name] for term in terms)
        metrics = {"loss": loss, **values}
        if teacher_outputs is not None:
            metrics["teacher_finite"] = all_finite((teacher_outputs.logits, teacher_outputs.activations))
        return loss, (state.get("batch_stats", {}), metrics)

    return loss_fn


def all_finite(tree) -> jax.Array:
    """() bool: whether every floating-point leaf of ``tree`` is free of NaN and inf (True for no such leaf)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(student, tx: optax.GradientTransformation, objective: Objective | Sequence[LossTerm],
                    teacher=None) -> Callable:
    """``train_step(state, teacher_variables, batch, rng) -> (state, metrics)``, not yet jitted.

    ``metrics``: ``loss`` and each loss term's value under its name (``task_loss``, ``matching_loss`` for an
    ``Objective``), and () bool flags ``gradients_finite``,
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
