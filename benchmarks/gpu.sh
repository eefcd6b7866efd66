#!/usr/bin/env bash
# vggfeat on an NVIDIA GPU through Keras's JAX backend, in one call of a few minutes, offline.
#
#   bash benchmarks/gpu.sh OUTDIR
#   VGGFEAT_GPU_DRY_RUN=1 bash benchmarks/gpu.sh OUTDIR    # the same steps, tiny, on a CPU
#
# Needs JAX (with CUDA on a GPU), h5py, Pillow, click, rich and numpy in the
# Python that runs it; nothing is downloaded. What that Python lacks travels as
# wheels in the ignored folder .whl/ (keras, namex, optree for Python 3.12,
# manylinux x86_64; see README.md, Performance): they are installed into a
# private folder, and vggfeat with --no-deps (TensorFlow is not needed). The
# results land in OUTDIR (results.md, results.json), to be fetched back.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
out=$(realpath -m "$out")   # before the cd below: a relative OUTDIR is the caller's
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$site" "$work"' EXIT

if ! "$python" -c "import jax" 2>/dev/null; then
  echo "$python has no JAX: run this with a Python that has it (PYTHON=...)" >&2
  exit 1
fi
if ! "$python" -c "import keras, vggfeat" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  fi
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export KERAS_BACKEND=jax
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
PYTHONUNBUFFERED=1 "$python" benchmarks/gpu.py --out "$out" --work "$work"
