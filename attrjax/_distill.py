"""Task and distillation losses (docs/method.md#distillation-and-task-losses). Teacher logits are always treated as
constants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

_LOG_EPS = 1e-7  # inside the student's log only, as in the paper's Bernoulli KD


def multilabel_soft_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """PyTorch's MultiLabelSoftMarginLoss: mean over B and K of the binary cross-entropy of sigmoid(logits).

    logits (B,K), labels (B,K) in {0,1} (or soft targets in [0,1]) -> scalar.
    """
    labels = labels.astype(logits.dtype)
    return -jnp.mean(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy for single-label data: logits (B,K), labels (B,) int or (B,K) one-hot (or class
    probabilities, e.g. smoothed labels) -> scalar."""
    log_probs = jax.nn.log_softmax(logits)
    if labels.ndim == logits.ndim:
        return -jnp.mean(jnp.sum(labels.astype(logits.dtype) * log_probs, axis=-1))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def binary_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
                   temperature: float = 4.0, alpha: float = 0.9) -> jax.Array:
    """Per-class Bernoulli KD mixed with the multi-label soft-margin loss (docs/method.md#multi-label-bernoulli-kd).

    With q = sigmoid(t/T), p = sigmoid(s/T):
      KL = T^2/(B*K) sum_{b,c} [q log q - q log(p + 1e-7) + (1-q) log(1-q) - (1-q) log(1-p + 1e-7)]
      loss = alpha * KL + (1 - alpha) * MLSM(s, y)

    Args:
      student_logits: (B,K).
      teacher_logits: (B,K), a constant (its gradient is stopped).
      labels: (B,K) multi-hot.
    """
    _check_pair(student_logits, teacher_logits)
    q = jax.nn.sigmoid(jax.lax.stop_gradient(teacher_logits) / temperature)
    p = jax.nn.sigmoid(student_logits / temperature)
    kl = (xlogy(q, q) - q * jnp.log(p + _LOG_EPS) + xlogy(1.0 - q, 1.0 - q) - (1.0 - q) * jnp.log(1.0 - p + _LOG_EPS))
    return alpha * temperature**2 * jnp.mean(kl) + (1.0 - alpha) * multilabel_soft_margin_loss(student_logits, labels)


def softmax_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
                    temperature: float = 4.0, alpha: float = 0.9) -> jax.Array:
    """Hinton et al.'s KD for single-label data: alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, y).

    Args:
      student_logits: (B,K).
      teacher_logits: (B,K), a constant (its gradient is stopped).
      labels: (B,) int classes or (B,K) one-hot.
    """
    _check_pair(student_logits, teacher_logits)
    teacher_log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
    student_log_probs = jax.nn.log_softmax(student_logits / temperature)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return alpha * temperature**2 * jnp.mean(kl) + (1.0 - alpha) * softmax_cross_entropy(student_logits, labels)


def _check_pair(student_logits: jax.Array, teacher_logits: jax.Array):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ; "
                         "teacher and student must predict the same classes")
