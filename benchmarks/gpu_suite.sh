#!/usr/bin/env bash
# The GPU measurements the CPU-only machines cannot make, in one run (about 6 minutes on one H100/H200):
# the GPU tests of train.data, DALI "mixed" images/s at 160/192/224 px with 4 and 12 CPU threads against the
# torchvision DataLoader with the same threads, and our bf16/channels_last training step (eager and
# compiled) against the reference fp16 NCHW step. Every result is appended to docs/BENCHMARKS.md.
# Run from the repository root with torch and DALI importable:  bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
"$python" -m pytest -q tests/test_data_gpu.py
for threads in 4 12; do
  "$python" -m benchmarks.dataloader --device gpu --res 160 192 224 --threads "$threads" --seconds 10 --baseline
done
"$python" -m benchmarks.train_step --device cuda --res 160 192 224 --batch-size 256 --steps 30
"$python" -m benchmarks.train_step --device cuda --res 160 192 224 --batch-size 256 --steps 30 --compile
# viz: evaluation (DALI on the GPU, bf16, flip-averaged as the rn50 recipe validates) and 20 Grad-CAM rows;
# the issue's goal is ImageNet's 50,000 val images + 20 rows in under a minute (> ~850 images/s).
"$python" -m benchmarks.viz_eval --device cuda --images 5000 --batch-size 256 --threads 12 --flip --cams 20
