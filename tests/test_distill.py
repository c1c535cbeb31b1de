"""Distillation and task losses against NumPy transcriptions of docs/method.md#distillation-and-task-losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax._distill import binary_kd_loss, multilabel_soft_margin_loss, softmax_cross_entropy, softmax_kd_loss


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _mlsm(s, y):
    return -np.mean(y * np.log(_sigmoid(s)) + (1 - y) * np.log(1 - _sigmoid(s)))


@pytest.fixture()
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(size=(5, 4)) * 3, rng.normal(size=(5, 4)) * 3, (rng.random((5, 4)) > 0.5).astype(np.float64)


def test_multilabel_soft_margin_matches_numpy(logits):
    s, _, y = logits
    np.testing.assert_allclose(multilabel_soft_margin_loss(jnp.asarray(s, jnp.float32), jnp.asarray(y)), _mlsm(s, y),
                               rtol=1e-5)


def test_binary_kd_matches_the_paper_formula(logits):
    s, t, y = logits
    temperature, alpha = 4.0, 0.9
    q, p = _sigmoid(t / temperature), _sigmoid(s / temperature)
    kl = q * np.log(q) - q * np.log(p + 1e-7) + (1 - q) * np.log(1 - q) - (1 - q) * np.log(1 - p + 1e-7)
    expected = alpha * temperature**2 * kl.sum() / s.size + (1 - alpha) * _mlsm(s, y)
    actual = binary_kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_kd_treats_teacher_logits_as_constants(logits):
    s, t, y = (jnp.asarray(a, jnp.float32) for a in logits)
    for loss in (lambda tt: binary_kd_loss(s, tt, y), lambda tt: softmax_kd_loss(s, tt, jnp.array([0, 1, 2, 3, 0]))):
        np.testing.assert_array_equal(jax.grad(loss)(t), 0.0)


def test_softmax_kd_matches_numpy(logits):
    s, t, _ = logits
    labels = np.array([0, 1, 2, 3, 0])
    temperature, alpha = 2.0, 0.7

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    pt, ls = np.exp(log_softmax(t / temperature)), log_softmax(s / temperature)
    kl = np.sum(pt * (np.log(pt) - ls), -1).mean()
    ce = -log_softmax(s)[np.arange(5), labels].mean()
    actual = softmax_kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(labels),
                             temperature=temperature, alpha=alpha)
    np.testing.assert_allclose(actual, alpha * temperature**2 * kl + (1 - alpha) * ce, rtol=1e-5)
    np.testing.assert_allclose(softmax_cross_entropy(jnp.asarray(s, jnp.float32), jnp.asarray(labels)), ce,
                               rtol=1e-5)


def test_mismatched_teacher_and_student_logits_are_rejected():
    with pytest.raises(ValueError, match="same classes"):
        binary_kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros((2, 3)))


def test_single_label_losses_take_one_hot_labels_as_class_indices():
    logits = draws.normal(jax.random.PRNGKey(3), (5, 7))
    teacher_logits = draws.normal(jax.random.PRNGKey(4), (5, 7))
    classes = jnp.array([0, 6, 2, 2, 5])
    one_hot = jax.nn.one_hot(classes, 7)
    np.testing.assert_allclose(softmax_cross_entropy(logits, one_hot), softmax_cross_entropy(logits, classes),
                               rtol=1e-6)
    np.testing.assert_allclose(softmax_kd_loss(logits, teacher_logits, one_hot),
                               softmax_kd_loss(logits, teacher_logits, classes), rtol=1e-6)
