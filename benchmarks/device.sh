#!/usr/bin/env bash
# The accelerator check: one call on a GPU (or TPU) machine, under 8 minutes, writing one JSON file per measurement.
#
#   bash benchmarks/device.sh [OUT_DIR]        # default: $OUT, else benchmarks/results/device
#
# What it measures, at the paper's size (227 px, VGG16 teacher + VGG16/8 student, 20 classes):
#   step_{float32,bfloat16}.json  the KD + attribution-matching train step at batch 64 (matched at conv4_3), with
#                                 the step's TFLOP/s and its fraction of an 8192^3 matmul in the same dtype;
#   evaluation.json               Grad-CAM, LRP, RAP and Excitation Backprop of every class, batched vs per pair;
#   input_pipeline.json           JPEG decode + RandomResizedCrop with 1-16 worker threads (host CPU).
# A machine without the Python packages attrjax needs can take them as wheels in .whl/ (installed to /tmp/site
# first): pip download --no-deps --only-binary=:all: -d .whl ml-collections tensorflow-datasets array-record \
#   dm-tree etils immutabledict promise simple-parsing tensorflow-metadata termcolor toml qwix tensorboardX
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/device}}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import jax; print('devices:', jax.devices())" | tee "$OUT_DIR/devices.txt"

run() {  # name, timeout in seconds, module and flags: a failing or overrunning part is recorded, the rest go on
  local name=$1 limit=$2; shift 2
  echo "== $name"
  if ! timeout "$limit" "$PYTHON" -m "$@" --out "$OUT_DIR/$name.json" > "$OUT_DIR/$name.log" 2>&1; then
    echo "$name failed or ran past ${limit}s; the end of its log:"; tail -5 "$OUT_DIR/$name.log"
  fi
}

PAPER_STEP=(--teacher vgg16 --student vgg16 --student-divisor 8 --batch 64 --image-size 227 --layer conv4_3
            --objective kd_match --steps 20 --peak-size 8192)
run step_float32 150 benchmarks.train_step "${PAPER_STEP[@]}" --dtype float32
run step_bfloat16 150 benchmarks.train_step "${PAPER_STEP[@]}" --dtype bfloat16
run evaluation 120 benchmarks.evaluation --model paper --batch 16 --methods gradcam lrp rap ebp --rounds 3
run input_pipeline 60 benchmarks.input_pipeline --workers 1 2 4 8 16 --batch 64 --image-size 227 --steps 4
ls -l "$OUT_DIR"
