"""experiments/evaluate.py pieces on a tiny model, without training: the teacher's agreement with itself is measured,
not assumed, and eval.figure_images=0 means no figures."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.models import init_variables, vgg
from experiments import configuration, evaluate

AGREEMENT_KEYS = ("map_cosine", "same_peak", "spearman", "top10_iou")
NUM_CLASSES = 3


@pytest.fixture
def setup():
    config = configuration.load_config("quick", ["eval_layer=conv2_1", "eval.batch_size=4", "eval.figure_images=2",
                                                 "eval.methods=gradcam", f"data.num_classes={NUM_CLASSES}",
                                                 "data.image_size=16"])
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 16, 16), np.uint8)
    masks[:, 2:9, 3:11] = 1
    masks[:, 10:14, 10:15] = 2
    masks[3, :2, :4] = 3
    labels = np.stack([(masks == c + 1).any(axis=(1, 2)) for c in range(NUM_CLASSES)], axis=1).astype(np.float32)
    arrays = {"image": rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), "mask": masks, "labels": labels}
    model = vgg(((4,), (8,)), num_classes=NUM_CLASSES, image_size=16)
    return config, arrays, model, init_variables(model, jax.random.key(0))


def _num_present(arrays):
    return int(sum((arrays["mask"][n] == c + 1).any() for n in range(len(arrays["mask"])) for c in range(NUM_CLASSES)))


def test_the_teachers_agreement_with_itself_is_computed(setup):
    config, arrays, model, variables = setup
    teacher_maps = {}
    summaries, examples = evaluate.localization_by_method("teacher", model, variables, arrays, ("gradcam",), config,
                                                          teacher_maps)
    summary = summaries["gradcam"]
    # Identical maps agree exactly where they are comparable; the teacher's constant (e.g. zero) maps are counted.
    raw = np.concatenate(teacher_maps["gradcam"])[:5]
    constant = sum(raw[n, c].max() == raw[n, c].min() for n in range(5) for c in range(NUM_CLASSES)
                   if (arrays["mask"][n] == c + 1).any())
    assert constant < _num_present(arrays)
    for key in AGREEMENT_KEYS:
        assert summary[key] == 1.0 and summary[f"{key}_excluded"] == constant, key
    assert "raw_maps" not in examples["gradcam"] and len(teacher_maps["gradcam"]) == 2  # cached, 2 batches

    # A student is compared with the cached maps: here the teacher itself under another name.
    student, _ = evaluate.localization_by_method("kd", model, variables, arrays, ("gradcam",), config, teacher_maps)
    assert {key: student["gradcam"][key] for key in AGREEMENT_KEYS} == {key: summary[key] for key in AGREEMENT_KEYS}


def test_a_nan_teacher_shows_nan_agreement(setup):
    config, arrays, model, variables = setup
    broken = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), variables)
    summaries, _ = evaluate.localization_by_method("teacher", model, broken, arrays, ("gradcam",), config, {})
    for key in AGREEMENT_KEYS:
        assert math.isnan(summaries["gradcam"][key]), key
        assert summaries["gradcam"][f"{key}_excluded"] == _num_present(arrays), key


def test_figure_images_0_writes_no_figures(setup, tmp_path):
    config, arrays, model, variables = setup
    config.eval.figure_images = 0
    summaries, examples = evaluate.localization_by_method("teacher", model, variables, arrays, ("gradcam",), config,
                                                          {})
    assert examples == {"gradcam": {}}
    assert evaluate.write_figures(str(tmp_path), {"teacher": examples}, ("gradcam",), config) == []
    assert os.listdir(tmp_path) == []
