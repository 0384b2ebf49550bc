#!/usr/bin/env bash
# Builds the CUDA kernel of an earlier git revision, for benchmarks/gpu_check.sh to time side by
# side with the current one. Needs git and nvcc, not a GPU: build here, carry the folder to the
# GPU machine (which may have no git history).
#
#   bash benchmarks/build_cuda_baseline.sh REV     # -> build/cuda_baseline/libarmquant_cuda.so
#
# gpu_check.sh then finds build/cuda_baseline/libarmquant_cuda.so (or $ARMQ_GPU_BASELINE) and
# adds a new/base column to its table. build/cuda_baseline/REVISION says which revision it is.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: build_cuda_baseline.sh REV (a git revision, e.g. HEAD~3 or a commit id)}
OUT=build/cuda_baseline
nvcc=$(command -v nvcc || true)
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
[ -z "$nvcc" ] && { echo "nvcc not found: install the CUDA toolkit or put its bin/ on PATH"; exit 2; }
commit=$(git rev-parse --verify "$REV^{commit}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$commit" export | tar -x -C "$tmp"
mkdir -p "$OUT"
# Same flags as gpu_check.sh's nvcc-alone build; written beside, then renamed, so a failed build
# leaves no library behind.
"$nvcc" -std=c++17 -O3 -Xcompiler -fPIC --shared -cudart static \
  -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
  -o "$OUT/libarmquant_cuda.so.tmp" "$tmp/export/cuda/arm_cuda.cu"
mv "$OUT/libarmquant_cuda.so.tmp" "$OUT/libarmquant_cuda.so"
echo "$commit" > "$OUT/REVISION"
echo "built $OUT/libarmquant_cuda.so from $commit"
