"""attrjax: compress neural networks (distillation, pruning) without breaking their attribution maps, in JAX.

Subpackages: ``attribution`` (Grad-CAM transforms), ``matching`` (the attribution-matching regulariser), ``distill``
(KD losses), ``models`` (VGG split into features/head), ``data`` (TFDS builders, input pipeline), ``metrics``,
``train`` (the jit step, loop, checkpoints, sharding) and ``evaluation``.
"""

__version__ = "0.1.0"
