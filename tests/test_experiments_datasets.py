"""End to end on the real datasets' fixtures: the paper's recipe (config `paper`) on a tiny VOC 2012 tarball, and
the single-label path (config `pet`) on a tiny prepared Oxford-IIIT Pet; shrunk in size and steps only."""

import jax
import numpy as np
import pytest

from attrjax.data import LabeledImages
from attrjax._evaluation import predict
from attrjax.models import export_vgg, init_variables, save_state_dict
from experiments import configuration, datasets, demo, evaluate, models, runs, train_teacher
from tests import voc_fixture
from tests.test_tfds_datasets import prepare_pet


def tiny_paper_overrides(manual_dir) -> list[str]:
    """The paper config with a 3-stage VGG11 at 32 px and one or two steps per run; data, losses and settings as
    published."""
    return [f"data.manual_dir={manual_dir}", "data.image_size=32", "data.batch_size=2",
            "teacher.layout=vgg11_s3", "teacher.width_divisor=16", "teacher.num_steps=2",
            "students.kd.layout=vgg11_s3", "students.kd.width_divisor=32", "students.kd.num_steps=1",
            "students.kd_match.layout=vgg11_s3", "students.kd_match.width_divisor=32", "students.kd_match.num_steps=1",
            "matching_layer=pool3", "eval_layer=conv3_2", "pruning.structured.rates=[0.5,0.0,0.0,0.5]",
            "pruning.structured.num_steps=1", "pruning.unstructured.rounds=1", "pruning.unstructured.steps_per_round=1",
            "quantization.num_steps=1", "quantization.calibration_images=2", "stochastic_drop_rate=0.0",
            "eval.batch_size=2", "eval.methods=gradcam", "eval.figure_images=2",
            "checkpoint_every=1", "log_every=1"]


def imagenet_layout_checkpoint(config, path) -> dict:
    """A torchvision-layout state dict for the config's teacher, with an ImageNet-style 3-layer classifier
    (classifier.0/3/6, 1000 classes), saved to `path`; returns it."""
    model = models.build_model(config.teacher, config)
    state_dict = export_vgg(init_variables(model, jax.random.key(7)), model)
    del state_dict["classifier.1.weight"], state_dict["classifier.1.bias"]
    flat = model.stage_widths[-1][-1] * model.final_spatial_size**2
    rng = np.random.default_rng(0)
    for index, (outputs, inputs) in zip((0, 3, 6), ((16, flat), (16, 16), (1000, 16))):
        state_dict[f"classifier.{index}.weight"] = rng.normal(size=(outputs, inputs)).astype(np.float32)
        state_dict[f"classifier.{index}.bias"] = np.zeros(outputs, np.float32)
    save_state_dict(state_dict, path)
    return state_dict


@pytest.mark.slow
def test_paper_recipe_runs_on_a_voc_tarball(tmp_path, capsys):
    manual_dir = tmp_path / "manual"
    voc_fixture.write_voc_tarball(tmp_path / "source", manual_dir)
    config = configuration.load_config("paper", tiny_paper_overrides(manual_dir))
    # The teacher starts from ImageNet-layout weights; with a zero learning rate its kernels stay exactly those.
    checkpoint = imagenet_layout_checkpoint(config, tmp_path / "vgg_bn.safetensors")
    config.teacher.pretrained = str(tmp_path / "vgg_bn.safetensors")
    config.teacher.optimizer.learning_rate = 0.0
    workdir = str(tmp_path / "run")

    splits = datasets.load_splits(config, workdir)
    assert isinstance(splits["train"], LabeledImages) and len(splits["train"]) == len(voc_fixture.MAIN["train"])
    assert splits["val"]["image"].shape == (len(voc_fixture.MAIN["val"]), 32, 32, 3)
    np.testing.assert_array_equal(splits["val"]["labels"],
                                  np.stack([voc_fixture.expected_labels(i) for i in voc_fixture.MAIN["val"]]))
    assert splits["localization"]["mask"].shape == (len(voc_fixture.SEGMENTATION["val"]), 32, 32)

    # A pruned teacher and the calibrated int8 teacher on VOC's natural images; the other settings train on the same
    # stream as the teacher and these, and run end to end in the demo test.
    config.runs = "structured_match,quantized"
    results = demo.run(config, workdir)
    assert list(results) == ["teacher", "structured_match", "quantized"]
    for row in results.values():
        assert 0.0 <= row["sample_map"] <= 1.0
    out = capsys.readouterr().out
    assert "voc2012/main: building" in out and "[structured_match] step 1/1" in out
    assert "[teacher] features from" in out and "a new 20-way classifier" in out
    _, teacher_variables = runs.load_teacher(config, workdir)
    np.testing.assert_array_equal(teacher_variables["params"]["conv3_2"]["kernel"],
                                  checkpoint["features.11.weight"].transpose(2, 3, 1, 0))
    assert (tmp_path / "run" / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_pet_config_trains_a_single_label_teacher_and_scores_its_top_class(tmp_path):
    data_dir, written = prepare_pet(tmp_path / "pet")
    config = configuration.load_config("pet", [f"data.data_dir={data_dir}", "data.image_size=32", "data.batch_size=2",
                                               "teacher.layout=vgg11_s3", "teacher.width_divisor=16",
                                               "teacher.num_steps=2", "matching_layer=pool3", "eval_layer=conv3_2",
                                               "eval.batch_size=2", "eval.methods=gradcam", "checkpoint_every=1",
                                               "log_every=1"])
    workdir = str(tmp_path / "run")
    splits = datasets.load_splits(config, workdir)
    assert isinstance(splits["train"], LabeledImages) and (splits["train"].labels.sum(axis=1) == 1).all()
    assert "mask" not in splits["val"] and splits["localization"]["mask"].shape[1:] == (32, 32)
    assert len(datasets.class_names(config, workdir)) == 37

    train_teacher.run(config, workdir, splits)  # softmax cross-entropy on one-hot labels
    model, variables = runs.load_teacher(config, workdir)
    row = evaluate.classification_and_size(model, variables, splits, config)
    assert 0.0 <= row["sample_map"] <= 1.0
    summaries, _ = evaluate.localization_by_method("teacher", model, variables, splits["localization"], ("gradcam",),
                                                   config, {})
    # Only each image's arg-max class is predicted (softmax logits are often all negative), so the pet class of an
    # image counts exactly when it is the teacher's top class.
    logits, labels = predict(model, variables, datasets.eval_batches(splits["localization"], config))
    top_is_pet = labels[np.arange(len(labels)), logits.argmax(axis=1)] > 0
    assert summaries["gradcam"]["num_present_not_predicted"] == int((~top_is_pet).sum())
