#!/usr/bin/env bash
# Every GPU benchmark in one call, for a lent GPU machine (e.g. the `device` tool's `run`):
#   bash benchmarks/gpu.sh            # writes $OUT/gpu-benchmarks.txt (or ./gpu-benchmarks.txt)
# Model throughput against torchvision's GoogLeNet at 224x224, batch 256 (with compile and the
# bf16 matmul peak), statistics overhead at 224x224, and the data loader against the model.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu-benchmarks.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  python benchmarks/bench_model.py --device cuda --size 224 --batch 256 --compile
  python benchmarks/bench_stats.py --device cuda --size 224 --skip-naive
  python benchmarks/bench_data.py --device cuda --batch-size 256 --workers 0 2 4 8 16
} 2>&1 | grep -v "it/s\]" | tee "$out"
