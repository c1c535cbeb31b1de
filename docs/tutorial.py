# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explain and compress your own model
#
# This notebook walks through attrjax end to end on a model written the way you would write your own: a plain
# Flax linen CNN that knows nothing about attrjax. It
#
# 1. renders a small labelled dataset with segmentation masks in memory,
# 2. trains the CNN as a teacher,
# 3. explains its predictions with Grad-CAM and LRP,
# 4. distils it into a smaller student twice, without and with attribution matching,
# 5. scores all three networks: accuracy, how well their maps point at the objects, and how close the students'
#    maps are to the teacher's.
#
# Everything is toy-sized so that the docs build can execute it in under a minute on two CPU cores: 32 x 32
# images, a few hundred training steps, one seed. The numbers at the end show what the tools report, not what
# matching does in general; for that, see the five-seed evidence ([Five seeds](../evidence/seeds/report/)), which
# ran the same comparison with larger networks, longer schedules and intervals over seeds. The source of this page
# is a [jupytext](https://jupytext.readthedocs.io) script, `docs/tutorial.py` in the repository; open it in Jupyter
# to run it cell by cell.

# %%
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import attrjax
from attrjax.data import (CLASS_NAMES, SHAPES_NORMALIZATION, ShapesConfig, eval_batches, normalize, render_split,
                          train_batches)

# %% [markdown]
# ## The data
#
# `attrjax.data.render_split` draws coloured shapes on cluttered backgrounds. Each example comes with its
# multi-hot labels and a segmentation mask (0 is background, class `k` is `k + 1`), and example `i` depends only on
# the configuration, the seed and `i`. We keep three classes (circle, square, triangle), one or two objects per image
# at 35-55% of its side, and render 512 training images and a separate test split of 64 with another seed.

# %%
config = ShapesConfig(image_size=32, num_classes=3, max_objects=2, min_object_size=0.35, max_object_size=0.55)
train_split = render_split(config, 512, seed=0)
test_split = render_split(config, 64, seed=1)
classes = CLASS_NAMES[:config.num_classes]
print({key: (value.shape, value.dtype.name) for key, value in train_split.items()})
print("training images per class:", dict(zip(classes, train_split["labels"].sum(axis=0).tolist())))


def names(labels):
    return ", ".join(name for name, present in zip(classes, labels) if present)


fig, axes = plt.subplots(2, 6, figsize=(10, 3.6))
for i in range(6):
    axes[0, i].imshow(test_split["image"][i])
    axes[0, i].set_title(names(test_split["labels"][i]), fontsize=8)
    axes[1, i].imshow(test_split["mask"][i], cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("test images (top) and their segmentation masks (bottom)")
plt.tight_layout()
plt.show()

# %% [markdown]
# The batch helpers normalise the uint8 images with `SHAPES_NORMALIZATION`. `train_batches` also crops and flips
# at random, and batch `step` is a pure function of the seed and the step, which is the form `attrjax.train` wants
# (a function from the step it starts at to an iterator of batches). `eval_batches` yields the test split in order,
# padding the last batch and marking the real rows in `valid`.

# %%
def batches(start_step):
    return train_batches(train_split, 32, seed=0, normalization=SHAPES_NORMALIZATION, start_step=start_step)


test_batches = list(eval_batches(test_split, 32, normalization=SHAPES_NORMALIZATION))
images = jnp.asarray(normalize(test_split["image"][:6], SHAPES_NORMALIZATION))  # six test images, normalised

# %% [markdown]
# ## A model of your own
#
# A plain linen classifier. The only thing attrjax needs from it is the name of a layer: any submodule whose output
# is a feature map `(B, H, W, C)` can be attributed at and matched at. Here `block`, the last convolution block (its
# output after the ReLU, 8 x 8), is where Grad-CAM reads its maps and where the student will be matched to the
# teacher. The `train` argument switches BatchNorm between batch and running statistics; attrjax passes it. The head
# takes each channel's maximum over the image ("is the pattern anywhere?"), which learnt faster than an average here
# in a few hundred steps.

# %%
class ConvBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), strides=self.strides, name="conv")(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))


class CNN(nn.Module):
    width: int
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBlock(self.width, name="stage1")(x, train)                    # 32 x 32
        x = ConvBlock(2 * self.width, strides=2, name="stage2")(x, train)     # 16 x 16
        x = ConvBlock(2 * self.width, strides=2, name="stage3")(x, train)     # 8 x 8
        x = ConvBlock(2 * self.width, name="block")(x, train)                 # 8 x 8: explained and matched here
        return nn.Dense(self.num_classes, name="head")(jnp.max(x, axis=(1, 2)))  # is the class anywhere?


teacher = CNN(width=16)
teacher_init = jax.jit(teacher.init)(jax.random.key(0), images)  # {"params", "batch_stats"}
print("layers attrjax found:", attrjax.as_split_model(teacher, images).layers)

# %% [markdown]
# ## Train the teacher
#
# `attrjax.Objective()` is the plain multi-label task loss. `attrjax.train` runs the jit-compiled step for a number of
# steps; `RunOptions` holds the bookkeeping (here: a progress line every 100 steps, sent to `print`; it can also
# keep checkpoints and metric files). It returns the final state and the logged lines.

# %%
teacher_state, _ = attrjax.train(
    teacher, teacher_init, optax.adam(5e-3), attrjax.Objective(), batches, 300, rng=jax.random.key(1),
    run=attrjax.RunOptions(log_every=100, name="teacher", log=print))
teacher_vars = teacher_state.variables

# %% [markdown]
# ## Explain it: Grad-CAM and LRP
#
# `attrjax.class_maps` gives every class's map for a batch in one call, with the logits. Grad-CAM's maps live at the
# layer's resolution (8 x 8 here); `resize_maps` brings them to the image size and `minmax_normalize` to [0, 1].
#
# LRP propagates the target logit back to the pixels through rules, one per layer. A `Composite` says which layer
# gets which rule: here alpha1-beta0 for the convolutions, the z^B rule for the first layer (bounded by the
# normalised values of a black and a white pixel) and the epsilon rule for the dense head. The rules are read off the
# traced forward pass, so nothing in `CNN` had to change.

# %%
gradcam_fn = jax.jit(functools.partial(attrjax.class_maps, teacher, method="gradcam", layer="block"))
maps, logits = gradcam_fn(teacher_vars, images)
print("Grad-CAM maps", maps.shape, "logits", logits.shape)  # (images, classes, 8, 8), (images, classes)
top = jnp.argmax(logits, axis=-1)                             # explain each image's top-scoring class
gradcam = attrjax.minmax_normalize(attrjax.resize_maps(maps[jnp.arange(len(top)), top], config.image_size))

black, white = (normalize(np.full((1, 1, 3), value, np.uint8), SHAPES_NORMALIZATION).item(0) for value in (0, 255))
composite = attrjax.Composite(default=attrjax.AlphaBeta(1.0, 0.0), first=attrjax.ZBox(black, white),
                              by_kind={"dense": attrjax.Epsilon(1e-3)})
lrp_fn = jax.jit(functools.partial(attrjax.lrp, teacher, composite=composite))
relevance = lrp_fn(teacher_vars, images, top)  # (images, 32, 32)
print("LRP relevance summed over each image:", np.round(relevance.sum(axis=(1, 2)), 2))
print("the logits it started from:          ", np.round(logits[jnp.arange(len(top)), top], 2))

fig, axes = plt.subplots(3, 6, figsize=(10, 5.4))
for i in range(6):
    axes[0, i].imshow(test_split["image"][i])
    axes[0, i].set_title(f"true: {names(test_split['labels'][i])}\nexplained: {classes[int(top[i])]}", fontsize=8)
    axes[1, i].imshow(test_split["image"][i])
    axes[1, i].imshow(gradcam[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    bound = float(jnp.abs(relevance[i]).max()) + 1e-9
    axes[2, i].imshow(test_split["image"][i].mean(axis=-1), cmap="gray")
    axes[2, i].imshow(relevance[i], cmap="bwr", alpha=0.7, vmin=-bound, vmax=bound)
for ax in axes.flat:
    ax.axis("off")
axes[1, 0].set_title("Grad-CAM at block", fontsize=8, loc="left")
axes[2, 0].set_title("LRP at the pixels", fontsize=8, loc="left")
plt.tight_layout()
plt.show()

# %% [markdown]
# What to look at: Grad-CAM is coarse (an 8 x 8 map, upsampled) and shows where the evidence for the explained class
# sits; the LRP map is pixel-sharp, red where pixels speak for the class and blue where they speak against it, and its
# sum is close to the logit it started from (alpha1-beta0 and z^B conserve relevance; the epsilon rule at the head
# lets the head's bias take a share). This teacher trained for seconds: where a map lands on the wrong object, or the
# explained class is not in the image, the map shows what the network relies on, which is what maps are for.

# %% [markdown]
# ## Distil it, without and with attribution matching
#
# The student is the same architecture at half the width (about a quarter of the parameters). Both students start
# from the same initial weights and see the same batches for the same number of steps with the same key; they differ
# only in the objective:
#
# - `Objective(kd="binary")`: knowledge distillation, the student learns from the teacher's per-class probabilities
#   (softened at temperature 4) and, with a weight of 1 - `kd_alpha` = 0.1, from the labels;
# - the same plus `matching="weighted"`: the paper's regulariser, which also pulls the student's Grad-CAM map at
#   `block` towards the teacher's, with weight `matching_weight` (lambda). The two networks' `block` maps must have
#   the same spatial size; the channel counts may differ.
#
# The matching step differentiates through the student's own gradients (double backprop); it takes longer to
# compile and to run.

# %%
student = CNN(width=8)
student_init = jax.jit(student.init)(jax.random.key(2), images)
objectives = {
    "student (KD)": attrjax.Objective(kd="binary"),
    "student (KD + matching)": attrjax.Objective(kd="binary", matching="weighted", matching_weight=10.0,
                                                 matching_layer="block"),
}
student_vars = {}
for name, objective in objectives.items():
    state, _ = attrjax.train(student, student_init, optax.adam(5e-3), objective, batches, 200, rng=jax.random.key(3),
                             teacher=teacher, teacher_variables=teacher_vars,
                             run=attrjax.RunOptions(log_every=100, name=name, log=print))
    student_vars[name] = state.variables

# %% [markdown]
# ## Score all three
#
# Evaluators are built once per architecture and method and compiled on their first batch; the student's serve both
# students. `ClassificationEvaluator` gives sample mAP and F1. `AttributionEvaluator` scores Grad-CAM at `block`
# against the segmentation masks over the (image, class) pairs whose class is present and predicted (`pairs`):
# pointing accuracy (is the map's peak on the object?) and mask AUC; with `reference=(teacher, teacher_vars)` it also
# compares each map with the teacher's map of the same image and class (mean cosine, over every present pair).

# %%
classify_teacher, classify_student = attrjax.ClassificationEvaluator(teacher), attrjax.ClassificationEvaluator(student)
explain_teacher, explain_student = (attrjax.AttributionEvaluator(model, layer="block", prediction_rule="positive_logit")
                                    for model in (teacher, student))
networks = {"teacher": (teacher, teacher_vars, classify_teacher, explain_teacher)}
networks |= {name: (student, variables, classify_student, explain_student) for name, variables in student_vars.items()}

rows, kept = [], {}
for name, (model, variables, classify, explain) in networks.items():
    accuracy = dict(classify.run(variables, test_batches))
    summary, kept[name] = explain.evaluate(variables, test_batches, reference=(teacher, teacher_vars), keep_maps=4)
    params = attrjax.count_params_and_flops(model, variables, images[:1])["params"]
    rows.append([name, f"{params:,}", f"{accuracy['sample_map']:.3f}", f"{accuracy['f1']:.3f}",
                 f"{summary['pointing_accuracy']:.3f}", f"{summary['mean_auc']:.3f}", str(summary["num_counted"]),
                 f"{summary['map_cosine']:.3f}"])

header = ["model", "params", "sample mAP", "F1", "pointing acc.", "mask AUC", "pairs", "cos. to teacher"]
widths = [max(len(row[column]) for row in [header] + rows) for column in range(len(header))]
for row in [header, ["-" * width for width in widths]] + rows:
    print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")

# %% [markdown]
# How to read it: the teacher's cosine to itself is 1 by construction. The students' sample mAP and F1 say how much
# accuracy the smaller network kept; their cosine says how much their Grad-CAM maps resemble the teacher's. Pointing
# accuracy and mask AUC count each network's own predicted pairs, so the networks are scored on different pairs.
# This is one tiny run with one seed, on 64 test images: differences of a few hundredths are within what another seed
# would change, and on another CPU the digits differ. The five-seed sweeps ([Five seeds](../evidence/seeds/report/))
# are where the comparison is made, with intervals.
#
# Last, the maps themselves, for the first test images and each image's top class by the teacher (the maps come from
# the evaluators' `keep_maps`, already resized to the image and normalised):

# %%
teacher_top = kept["teacher"]["logits"].argmax(axis=-1)
fig, axes = plt.subplots(4, 1 + len(kept), figsize=(7.5, 8))
for i in range(4):
    axes[i, 0].imshow(test_split["image"][i])
    axes[i, 0].set_ylabel(classes[teacher_top[i]], fontsize=9)
    for column, (name, examples) in enumerate(kept.items(), start=1):
        axes[i, column].imshow(test_split["image"][i])
        axes[i, column].imshow(examples["maps"][i, teacher_top[i]], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        if i == 0:
            axes[i, column].set_title(name, fontsize=9)
axes[0, 0].set_title("image", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Where to go next
#
# - Other attribution methods: `attrjax.class_maps(..., method)` takes any of `attrjax.METHODS` (saliency,
#   integrated gradients, EBP, RAP, ...), and `AttributionEvaluator(..., method=...)` scores them.
# - Other compressions: pruning (`attrjax.magnitude_masks`, `attrjax.prune_filters`) and int8 / int4 quantization
#   (`attrjax.calibrate`, `attrjax.deploy`) take the same model and the same objectives; the
#   [API reference](../api/) lists them.
# - Your own loss: an objective is a list of loss terms (`attrjax.training`), e.g. matching at several layers or with
#   a map of your own; [the method](../method/) explains what the matching loss computes.
