#!/usr/bin/env bash
# The benchmark suite on a machine with an NVIDIA GPU, in a few minutes, offline.
#
#   bash benchmarks/gpu.sh [RESULTS_FILE]
#
# Needs TensorFlow with CUDA in the Python that runs it (pip install
# 'tensorflow[and-cuda]==2.21.*' and this package). The image folder is made
# on the spot from sample_images/, so nothing is downloaded. Figures are
# appended to RESULTS_FILE (default benchmarks/RESULTS.md) with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/RESULTS.md}
python=${PYTHON:-python3}

"$python" - <<'PY'
from vggfeat.runtime import gpus
found = gpus()
if not found:
    raise SystemExit("TensorFlow sees no GPU here; install tensorflow[and-cuda] or run the CPU suite")
print("TensorFlow sees", ", ".join(g.name for g in found))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PYTHONUNBUFFERED=1 "$python" benchmarks/run.py --profile gpu --work "$work" --results "$results"
