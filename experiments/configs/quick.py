"""The laptop preset behind `make demo`: a 64 px synthetic dataset, a 3-stage VGG16 teacher and x4 students.

Layer choice (DESIGN.md "Numbers to aim at"): at 64 px VGG16's pool5 is 2x2, too coarse to localise, so the demo
uses the first three VGG16 stages. Its last pool (pool3, 8x8) plays the paper's pool5 (matching layer) and its last
conv (conv3_3, 16x16) the paper's conv5_3 (Grad-CAM evaluation layer); the head stays purely linear as in the paper.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = dict(
        name="shapes", data_dir="", image_size=64, num_classes=6, context_cue=0.0,
        num_train=6000, num_val=1000, num_localization=500, batch_size=64, crop_padding=4,
    )
    config.matching_layer = "pool3"
    config.eval_layer = "conv3_3"
    config.teacher = dict(
        layout="vgg16_s3", width_divisor=4, dropout_rate=0.5, num_steps=400,
        optimizer=dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                       warmup_steps=20),
    )
    student = dict(
        layout="vgg16_s3", width_divisor=16, dropout_rate=0.5, num_steps=300,
        optimizer=dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                       warmup_steps=20),
    )
    kd = dict(labels="multilabel", kd="binary", temperature=4.0, kd_alpha=0.9)
    config.students = dict(
        kd=dict(student, objective=dict(kd)),
        kd_match=dict(student, objective=dict(kd, matching="weighted", matching_weight=100.0)),
    )
    # Stochastic matching (PAPER.md §2.6) as a switch: adds a third student whose teacher maps drop this fraction
    # of channels each step (the paper's README uses 0.3).
    config.stochastic_drop_rate = 0.0
    config.eval = dict(batch_size=100, tolerance=0, figure_images=6)
    config.checkpoint_every = 200
    config.log_every = 50
    return config
