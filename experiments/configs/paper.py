"""The paper's PASCAL VOC 2012 recipe (docs/method.md#data-and-preprocessing, #optimisation-recipe), values as
published.

    python -m experiments.train_teacher --config paper --workdir runs/paper \
        --config.data.manual_dir=/data/voc --config.teacher.pretrained=/weights/vgg16_bn-6c64b313.pth

(README "Reproducing the paper" has every command.) Data: `attrjax.data.voc` builds VOC 2012 from the user's
trainval tarball into `data.data_dir` (default `<workdir>/data`); training images are RandomResizedCrop(227) + flip,
evaluation images are resized to 227 x 227, with the VOC normalisation. The teacher starts from torchvision's
ImageNet `vgg16_bn` weights (`teacher.pretrained`: a .pth, .safetensors or .npz state dict) with a fresh 20-way
head. Steps are epochs x 89: every step is a full batch of 64 (5,717 // 64 = 89), where the reference's loader adds
a 90th batch of 21 images per epoch.

Fixes applied (docs/method.md#differences-from-the-reference-code): the KD optimizer gets the momentum 0.9 its
argparse defines (the reference code drops it); teacher outputs are constants (stop_gradient); the pruning teacher is
in eval mode; the structured head keeps the right columns. Pruning keeps the final fine-tuned weights, where the
reference code also saves the best-validation checkpoint of each fine-tuning (the next round starts from the final
weights in both).
"""

import ml_collections

from attrjax.pruning import vgg16_paper_rates

VOC_TRAIN_IMAGES = 5717
BATCH_SIZE = 64


def get_config(variant: str = "vgg") -> ml_collections.ConfigDict:
    """This preset; ``--config paper:resnet`` is the same with ResNets (``paper_resnet.py``)."""
    if variant == "resnet":
        from experiments.configs import paper_resnet  # ResNet edits of this preset's VGG config

        return paper_resnet.get_config()
    if variant != "vgg":
        raise ValueError(f"the paper preset has the variants vgg and resnet, not {variant!r}")
    # include_difficult: difficult objects count as positives, as in the paper; False leaves them out.
    data = dict(name="voc2012", data_dir="", manual_dir="", image_size=227, num_classes=20, labels="multilabel",
                include_difficult=True, batch_size=BATCH_SIZE)
    return recipe(data, steps_per_epoch=VOC_TRAIN_IMAGES // BATCH_SIZE, kd="binary")


def recipe(data: dict, *, steps_per_epoch: int, kd: str) -> ml_collections.ConfigDict:
    """The paper's models, schedules and losses on dataset `data`, epochs counted in `steps_per_epoch` steps;
    `kd`: "binary" (multi-label Bernoulli KD) or "softmax" (single-label Hinton KD)."""

    def steps(*epochs: int) -> int | tuple[int, ...]:
        return epochs[0] * steps_per_epoch if len(epochs) == 1 else tuple(e * steps_per_epoch for e in epochs)

    config = ml_collections.ConfigDict()
    config.seed = 42
    # How the training batches are built (not part of a run: the batches are the same): grain worker processes
    # (0: in the training process) and batches built at once per process (0: one per core, at most 16).
    config.data = dict(data, workers=0, threads=0)
    # What teacher and students compute in: float32, or bfloat16 (parameters, optimizer state, losses, maps and
    # evaluation stay float32; docs/mixed_precision.md).
    config.compute_dtype = "float32"
    config.matching_layer = "pool5"  # 7x7 at 227 px
    config.eval_layer = "conv5_3"  # 14x14, the paper's Grad-CAM evaluation layer
    config.teacher = dict(
        arch="vgg", layout="vgg16", width_divisor=1, dropout_rate=0.5, head_pooling="flatten", pretrained="",
        num_steps=steps(60),
        optimizer=dict(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="step",
                       boundaries=steps(10, 30, 40), decay_factor=0.1),
    )
    student = dict(
        arch="vgg", layout="vgg16", width_divisor=8, dropout_rate=0.5, head_pooling="flatten",
        num_steps=steps(350),
        optimizer=dict(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="step",
                       boundaries=steps(150, 200, 250), decay_factor=0.1),
    )
    kd = dict(kd=kd, temperature=4.0, kd_alpha=0.9)
    config.students = dict(
        kd=dict(student, objective=dict(kd)),
        kd_match=dict(student, objective=dict(kd, matching="weighted", matching_weight=100.0)),
    )
    # Pruning fine-tunes the teacher with the task loss (+ lambda * matching): SGD 1e-3 constant, 30 epochs.
    finetune = dict(name="sgd", learning_rate=1e-3, momentum=0.9, weight_decay=1e-4, schedule="constant")
    config.pruning = dict(
        matching_weight=100.0,
        # The paper's p is unknown: its README prunes one-shot at 0.3, its evaluation scripts default to 0.7.
        structured=dict(rates=vgg16_paper_rates(0.3), num_steps=steps(30), optimizer=finetune),
        unstructured=dict(rate=0.2, rounds=16, steps_per_round=steps(30), optimizer=finetune),
    )
    # Quantization, beyond the paper: int8 PTQ calibrated on 1024 training images, and QAT fine-tuned as pruning is.
    config.quantization = dict(bits=8, calibration_images=1024, num_steps=steps(30), optimizer=finetune,
                               matching_weight=100.0)
    config.stochastic_drop_rate = 0.3
    # Which student and pruning runs to train and evaluate: comma-separated names (e.g. "kd,kd_match"), "" for all.
    config.runs = ""
    config.eval = dict(batch_size=32, tolerance=0, figure_images=6, methods="paper", localization_images=0,
                       method_options={}, faithfulness_steps=0)
    config.checkpoint_every = steps(5)
    config.log_every = 50
    # A work directory is bound to the settings that wrote each of its runs: "refuse" a rerun with other settings,
    # or "restart" the changed runs (the old ones are kept as <run>/checkpoints.replaced-<digest>).
    config.on_config_change = "refuse"
    return config
