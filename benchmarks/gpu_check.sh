#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA ARM kernel, check it bit for bit against the
# reference on fresh random inputs, check CUDA graph capture, time it against its baselines, and
# print a table last (benchmarks/gpu_check.py). Writes gpu_check.json to $OUT when set.
#
#   bash benchmarks/gpu_check.sh               # build if needed, then the full check
#   bash benchmarks/gpu_check.sh --quick       # fewer shapes and iterations
#   bash benchmarks/gpu_check.sh --build-only  # build only (needs nvcc, not a GPU)
#   bash benchmarks/gpu_check.sh --ncu         # Nsight Compute metrics of each kernel (ncu.txt)
#
# With build/cuda_baseline/libarmquant_cuda.so present (benchmarks/build_cuda_baseline.sh REV,
# or $ARMQ_GPU_BASELINE), that earlier kernel is timed side by side and compared bit for bit.
#
# Builds with CMake when export/CMakeLists.txt is present (the library the PyTorch binding and
# ONNX Runtime load), and falls back to compiling export/cuda/arm_cuda.cu alone with nvcc when
# there is no CMake project or its build fails. Either way the kernel code is the same. A library
# in build/gpu_check/ newer than every file under export/ is reused, so it can be built on a
# machine without a GPU and carried over.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${ARMQ_GPU_BUILD:-build/gpu_check}
mkdir -p "$BUILD"
say() { echo "[gpu_check] $*"; }
fail() { echo "[gpu_check] ERROR: $*"; exit 2; }
BUILD_ONLY=0 NCU=0
if [ "${1:-}" = "--build-only" ]; then BUILD_ONLY=1; shift; fi
if [ "${1:-}" = "--ncu" ]; then NCU=1; shift; fi
PY=${PYTHON:-python3}

say "git rev $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

up_to_date() {  # $1: a built library; true when no source under export/ is newer
  [ -f "$1" ] && [ -z "$(find export -type f -newer "$1" | head -1)" ]
}

build() {
  local nvcc
  nvcc=$(command -v nvcc || true)
  [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
  [ -z "$nvcc" ] && fail "nvcc not found: install the CUDA toolkit or put its bin/ on PATH"
  say "nvcc: $("$nvcc" --version | tail -1)"
  export CUDACXX=${CUDACXX:-$nvcc}  # the CUDA compiler CMake picks
  if [ -f export/CMakeLists.txt ] && command -v cmake >/dev/null; then
    # No network on the GPU machine: ONNX Runtime headers from $ARMQ_ORT_INCLUDE_DIR or build/ort-headers/.
    local ort_dir=${ARMQ_ORT_INCLUDE_DIR:-} ort_args=()
    [ -z "$ort_dir" ] && [ -f build/ort-headers/onnxruntime_c_api.h ] && ort_dir=$PWD/build/ort-headers
    [ -n "$ort_dir" ] && ort_args=("-DARMQ_ORT_INCLUDE_DIR=$ort_dir") && say "ONNX Runtime headers: $ort_dir"
    # A build folder carried from another checkout: its CMake cache names another source folder.
    if [ -f "$BUILD/cmake/CMakeCache.txt" ] \
       && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$PWD/export" "$BUILD/cmake/CMakeCache.txt"; then
      rm -rf "$BUILD/cmake"
    fi
    say "building with CMake (export/CMakeLists.txt) into $BUILD/cmake"
    if timeout 300 cmake -S export -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release -DARMQ_CUDA=ON \
         ${ort_args[@]+"${ort_args[@]}"} >"$BUILD/cmake.log" 2>&1 \
       && timeout 300 cmake --build "$BUILD/cmake" -j "$(nproc)" >>"$BUILD/cmake.log" 2>&1; then
      LIB=$(find "$BUILD/cmake" -name 'libarmquant_ort*.so' | head -1)
      [ -n "$LIB" ] && return 0
      say "CMake built no libarmquant_ort.so"
    else
      say "CMake build failed (last lines of $BUILD/cmake.log below); falling back to nvcc alone"
      tail -15 "$BUILD/cmake.log"
    fi
  fi
  LIB="$BUILD/libarmquant_cuda.so"
  say "building $LIB with nvcc alone (sm_90 + PTX)"
  timeout 300 "$nvcc" -std=c++17 -O3 -Xcompiler -fPIC --shared -cudart static -Werror all-warnings \
    -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
    -o "$LIB" export/cuda/arm_cuda.cu || fail "nvcc build of export/cuda/arm_cuda.cu failed"
}

LIB=""
for candidate in "$BUILD/cmake/libarmquant_ort.so" "$BUILD/libarmquant_cuda.so"; do
  if up_to_date "$candidate"; then LIB=$candidate; say "reusing $LIB (newer than every file under export/)"; break; fi
done
[ -z "$LIB" ] && build
"$PY" -c "import ctypes, os, sys; sys.exit(0 if ctypes.CDLL(os.path.abspath('$LIB')).armq_has_cuda() == 1 else 1)" \
  || fail "$LIB carries no CUDA kernel (armq_has_cuda() != 1)"
say "library: $LIB"
[ $BUILD_ONLY -eq 1 ] && exit 0

"$PY" -c "import torch, sys; print('[gpu_check] torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "PyTorch cannot see a CUDA device (torch.cuda.is_available() is False)"
# armquant._native (the PyTorch binding) loads the full library only; the nvcc-alone build
# carries just the CUDA entry points, so the binding check is then skipped with a reason.
case "$LIB" in
  */libarmquant_ort*.so) export ARMQUANT_LIBRARY="$(cd "$(dirname "$LIB")" && pwd)/$(basename "$LIB")" ;;
  *) unset ARMQUANT_LIBRARY; export ARMQUANT_GPU_CHECK_STANDALONE=1 ;;
esac
if [ $NCU -eq 1 ]; then  # per-kernel hardware metrics: where each kernel's time goes
  ncu=$(command -v ncu || true)
  [ -z "$ncu" ] && [ -x /usr/local/cuda/bin/ncu ] && ncu=/usr/local/cuda/bin/ncu
  [ -z "$ncu" ] && fail "--ncu: Nsight Compute (ncu) not found"
  report=${OUT:-$BUILD}/ncu.txt
  say "Nsight Compute on one call of each timed configuration -> $report"
  timeout 300 "$ncu" --target-processes all --kernel-name regex:k_ \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis "$PY" benchmarks/gpu_check.py --lib "$LIB" --profile-workload >"$report" 2>&1
  rc=$?
  tail -40 "$report"
  exit $rc
fi
# An earlier kernel to time side by side (benchmarks/build_cuda_baseline.sh builds one).
BASELINE=${ARMQ_GPU_BASELINE:-build/cuda_baseline/libarmquant_cuda.so}
baseline_args=()
if [ -f "$BASELINE" ]; then
  say "baseline: $BASELINE (revision $(cat "$(dirname "$BASELINE")/REVISION" 2>/dev/null || echo unknown))"
  baseline_args=(--baseline-lib "$BASELINE")
fi
timeout 420 "$PY" benchmarks/gpu_check.py --lib "$LIB" ${baseline_args[@]+"${baseline_args[@]}"} "$@"
rc=$?
[ $rc -eq 124 ] && say "ERROR: gpu_check.py ran past 420 s and was stopped"
exit $rc
