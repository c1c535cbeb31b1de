"""The paper's recipe (`paper.py`) on Oxford-IIIT Pet: 37 breeds, single-label (softmax cross-entropy, Hinton KD),
masks from the trimaps (the uncertain border is void), ImageNet normalisation for the ImageNet-pretrained teacher.

    python -m experiments.train_teacher --config pet --workdir runs/pet \\
        --config.data.data_dir=/data/tfds --config.teacher.pretrained=/weights/vgg16_bn-6c64b313.pth

The dataset must be prepared in `data.data_dir` in the array_record format (`attrjax.data.load_tfds_split`). The
test split (3,669 images) serves both classification and localisation, as the dataset has no validation split.
`birds.py` is the same for CUB-200-2011.
"""

import ml_collections

from experiments.configs import paper

PET_TRAIN_IMAGES = 3680


def get_config() -> ml_collections.ConfigDict:
    data = dict(name="oxford_iiit_pet", data_dir="", image_size=227, num_classes=37, labels="single",
                batch_size=paper.BATCH_SIZE)
    return paper.recipe(data, steps_per_epoch=PET_TRAIN_IMAGES // paper.BATCH_SIZE, kd="softmax")
