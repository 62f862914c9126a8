#!/usr/bin/env bash
# GPU checks and benchmarks in one short run (a few minutes on one H100):
#   CUDA correctness checks, AMP train steps of HRNetV2-W48 and DeepLabV3-ResNet-101 with
#   contrast at 2x512x1024, then the loss, step and Table 1 benchmarks on the GPU.
# Usage: scripts/gpu_check.sh [OUTPUT_FILE]   (default gpu_check.txt); needs the package
# importable (pip install -e . or PYTHONPATH=src).
set -uo pipefail
out="${1:-gpu_check.txt}"
py="${PYTHON:-python3}"
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" scripts/gpu_checks.py || status=1
  echo "== contrastseg bench loss --device cuda"
  "$py" -m contrastseg bench loss --device cuda --repeats 5 || status=1
  echo "== contrastseg bench step (DeepLabV3-MobileNetV3, 2x256x512)"
  "$py" -m contrastseg bench step configs/demo_contrast.yaml --device cuda --batch 2 \
    --height 256 --width 512 --repeats 10 || status=1
  for amp in off bf16; do
    echo "== contrastseg bench train --device cuda --amp $amp (2x512x1024)"
    "$py" -m contrastseg bench train --device cuda --amp "$amp" --batch 2 --height 512 \
      --width 1024 --repeats 5 || status=1
  done
  echo "exit status: $status"
} 2>&1 | tee "$out"
exit "$status"
