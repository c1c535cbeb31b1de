"""The paper's recipe (`paper.py`) on CUB-200-2011 (`caltech_birds2011`): 200 species, single-label, bird masks
from the averaged annotator segmentations, ImageNet normalisation; the test split (5,794 images) serves
classification and localisation. Prepared and run as `pet.py`, with `--config birds`.
"""

import ml_collections

from experiments.configs import paper

CUB_TRAIN_IMAGES = 5994


def get_config() -> ml_collections.ConfigDict:
    data = dict(name="caltech_birds2011", data_dir="", image_size=227, num_classes=200, labels="single",
                batch_size=paper.BATCH_SIZE)
    return paper.recipe(data, steps_per_epoch=CUB_TRAIN_IMAGES // paper.BATCH_SIZE, kd="softmax")
