"""The paper's VOC recipe (`paper.py`) with ResNet-50s: an ImageNet ResNet-50 teacher with a fresh 20-way head, x8
ResNet-50 students, structured pruning of every block's inner convs.

    python -m experiments.demo --config paper_resnet --workdir runs/paper_resnet \\
        --config.data.manual_dir=/data/voc --config.teacher.pretrained=/weights/resnet50-0676ba61.pth

Layers: at 227 px the last block (`layer4_2`) outputs 8x8 (the ImageNet stem and three strided stages divide by 32,
rounding up), the ResNet's counterpart of VGG16's 7x7 pool5; it is both the matching and the Grad-CAM layer.
Schedules, losses, lambda and the stochastic drop rate are the VGG recipe's. Structured pruning removes 30% of the
filters of every block's inner convs (the paper's p = 0.3 on the convs that do not feed a residual sum), one shot;
`pruning.structured.coupled=True` also prunes the residual streams.
"""

import ml_collections

from experiments.configs import paper


def get_config() -> ml_collections.ConfigDict:
    config = paper.get_config()
    config.matching_layer = "layer4_2"
    config.eval_layer = "layer4_2"
    teacher = config.teacher.to_dict()
    config.teacher = dict(arch="resnet50", width_divisor=1, stem="imagenet", pretrained=teacher["pretrained"],
                          num_steps=teacher["num_steps"], optimizer=teacher["optimizer"])
    students = config.students.to_dict()
    config.students = {name: dict(arch="resnet50", width_divisor=8, stem="imagenet", num_steps=run["num_steps"],
                                  optimizer=run["optimizer"], objective=run["objective"])
                       for name, run in students.items()}
    structured = config.pruning.structured.to_dict()
    config.pruning.structured = dict(rates=0.3, coupled=False, num_steps=structured["num_steps"],
                                     optimizer=structured["optimizer"])
    return config
