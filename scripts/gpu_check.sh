#!/usr/bin/env bash
# GPU checks and benchmarks in one run (several minutes on one H100):
#   CUDA correctness checks (among them the class-slot memory term against the CPU and the
#   bf16 memory term against float32), AMP train steps of HRNetV2-W48 and DeepLabV3-ResNet-101
#   with contrast at 2x512x1024, the loss, memory, step and Table 1 benchmarks on the GPU, the
#   step breakdown (each contrast part against its floor) of every Table 1 model and of the
#   authors' memory operating point at 2x512x1024, and a short bf16 training of the contrast
#   demo with gradient accumulation.
# Usage: scripts/gpu_check.sh [OUTPUT_FILE] [all|breakdown]   (default gpu_check.txt, all);
#   "breakdown": only the CUDA checks and the breakdowns (about 5 minutes). Needs the package
#   importable (pip install -e . or PYTHONPATH=src).
set -uo pipefail
out="${1:-gpu_check.txt}"
what="${2:-all}"
py="${PYTHON:-python3}"
status=0

breakdowns() {
  for stem in deeplabv3_mobilenetv1 deeplabv3_mobilenetv2 deeplabv3_mobilenetv3 \
      deeplabv3_resnet101 hrnetv2_w48 ocr_resnet101 ocr_hrnetv2_w48 hrnetv2_w48_mem; do
    cfg="configs/cityscapes/${stem}_contrast.yaml"
    [ "$stem" = hrnetv2_w48_mem ] && cfg=configs/cityscapes/hrnetv2_w48_contrast_mem.yaml
    echo "== contrastseg bench step $cfg --breakdown --device cuda (2x512x1024)"
    "$py" -m contrastseg bench step "$cfg" --breakdown --device cuda --batch 2 --height 512 \
      --width 1024 --repeats 5 --set model.backbone.pretrained=false || status=1
  done
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" scripts/gpu_checks.py || status=1
  if [ "$what" = breakdown ]; then
    breakdowns
  else
    echo "== contrastseg bench loss --device cuda"
    "$py" -m contrastseg bench loss --device cuda --repeats 5 || status=1
    echo "== contrastseg bench memory --device cuda"
    "$py" -m contrastseg bench memory --device cuda --repeats 10 || status=1
    mnv3=configs/cityscapes/deeplabv3_mobilenetv3_contrast.yaml
    for hidden in null 256; do
      echo "== contrastseg bench step (DeepLabV3-MobileNetV3, 2x256x512, projection_hidden $hidden)"
      "$py" -m contrastseg bench step "$mnv3" --device cuda --batch 2 --height 256 --width 512 \
        --repeats 20 --set model.backbone.pretrained=false \
        --set "model.projection_hidden=$hidden" || status=1
    done
    breakdowns
    for amp in off bf16; do
      echo "== contrastseg bench train --device cuda --amp $amp (2x512x1024)"
      "$py" -m contrastseg bench train --device cuda --amp "$amp" --batch 2 --height 512 \
        --width 1024 --repeats 5 || status=1
    done
    echo "== contrastseg train configs/demo_contrast.yaml: cuda, bf16, grad_accum 2, 300 iters"
    runs="$(mktemp -d)"
    timeout 240 "$py" -m contrastseg train configs/demo_contrast.yaml --no-progress \
      --set train.device=cuda --set train.amp=bf16 --set train.grad_accum=2 \
      --set train.iters=300 --set data.num_workers=6 --set "output.root=$runs" || status=1
  fi
  echo "exit status: $status"
} 2>&1 | tee "$out"
exit "$status"
