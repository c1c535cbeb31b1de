"""The laptop preset with ResNets: the demo's data, schedules and grid (`quick.py`), a small ResNet teacher and
2x narrower ResNet students.

    make demo ARGS="--config quick_resnet"

Models: `resnet_small` (basic blocks, one per stage, the 3x3 stem without pooling, widths 16-128 at 64 px) as the
teacher, the same at half width (8-64) as the KD student. Layer choice: the last block, `layer4_0`, is 8x8 at 64 px
(its four stages halve 64 px three times), the ResNet's counterpart of the paper's pool5; it serves as both the
matching and the Grad-CAM evaluation layer (the layer before it is 16x16 but feeds a whole stage more).
"""

import ml_collections

from experiments.configs import quick


def get_config() -> ml_collections.ConfigDict:
    config = quick.get_config("long")  # the schedules the ResNet grid was measured with
    config.matching_layer = "layer4_0"
    config.eval_layer = "layer4_0"
    optimizer = config.teacher.optimizer.to_dict()
    config.teacher = dict(arch="resnet_small", stage_sizes=(1, 1, 1, 1), width_divisor=1,
                          num_steps=config.teacher.num_steps, optimizer=optimizer)
    student = dict(arch="resnet_small", stage_sizes=(1, 1, 1, 1), width_divisor=2,
                   num_steps=config.students.kd.num_steps, optimizer=optimizer)
    config.students = {name: dict(student, objective=run.objective.to_dict()) for name, run in config.students.items()}
    # Structured: every block's inner conv and, coupled across the residual additions, every stage's stream at 0.5:
    # about a quarter of the teacher's parameters, as small as the half-width KD student.
    config.pruning.structured = dict(rates=0.5, coupled=True, num_steps=config.pruning.structured.num_steps,
                                     optimizer=config.pruning.structured.optimizer.to_dict())
    return config
