"""The experiment modules: runnable entry points (``python -m experiments.demo``) over the attrjax library."""

import os

# XLA:CPU in jaxlib 0.10 hands every convolution to YNNPACK by default. On the 2-core AVX2 machines this project is
# measured on, that keeps about 1.4 cores busy where XLA's own convolutions keep 2, and the demo's train steps ran
# 1.5x slower with it (teacher 284 -> 193 ms, student 165 -> 111 ms a step; losses equal to 5e-4). The experiments
# leave it off unless XLA_FLAGS already says otherwise. Read before JAX starts its backend.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FLAG}=".strip()
