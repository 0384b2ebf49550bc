#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA ARM kernel, check it bit for bit against the
# reference on fresh random inputs, check CUDA graph capture, time it against its baselines, and
# print a table last (benchmarks/gpu_check.py). Writes gpu_check.json to $OUT when set.
#
#   bash benchmarks/gpu_check.sh            # full check, about 2 to 3 minutes on an H200
#   bash benchmarks/gpu_check.sh --quick    # fewer shapes and iterations
#
# Builds with CMake when export/CMakeLists.txt is present (the library the PyTorch binding and
# ONNX Runtime load), and falls back to compiling export/cuda/arm_cuda.cu alone with nvcc when
# there is no CMake project or its build fails. Either way the kernel code is the same.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${ARMQ_GPU_BUILD:-build/gpu_check}
mkdir -p "$BUILD"
say() { echo "[gpu_check] $*"; }
fail() { echo "[gpu_check] ERROR: $*"; exit 2; }

say "git rev $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
[ -z "$NVCC" ] && fail "nvcc not found: install the CUDA toolkit or put its bin/ on PATH"
say "nvcc: $("$NVCC" --version | tail -1)"
export CUDACXX=${CUDACXX:-$NVCC}  # the CUDA compiler CMake picks
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; print('[gpu_check] torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "PyTorch cannot see a CUDA device (torch.cuda.is_available() is False)"

LIB=""
if [ -f export/CMakeLists.txt ] && command -v cmake >/dev/null; then
  say "building with CMake (export/CMakeLists.txt) into $BUILD/cmake"
  # No network on the GPU machine: ONNX Runtime headers from $ARMQ_ORT_INCLUDE_DIR or build/ort-headers/.
  ORT_ARGS=()
  ORT_DIR=${ARMQ_ORT_INCLUDE_DIR:-}
  [ -z "$ORT_DIR" ] && [ -f build/ort-headers/onnxruntime_c_api.h ] && ORT_DIR=$PWD/build/ort-headers
  [ -n "$ORT_DIR" ] && ORT_ARGS=("-DARMQ_ORT_INCLUDE_DIR=$ORT_DIR") && say "ONNX Runtime headers: $ORT_DIR"
  if timeout 300 cmake -S export -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release -DARMQ_CUDA=ON ${ORT_ARGS[@]+"${ORT_ARGS[@]}"} \
       >"$BUILD/cmake.log" 2>&1 \
     && timeout 300 cmake --build "$BUILD/cmake" -j "$(nproc)" >>"$BUILD/cmake.log" 2>&1; then
    LIB=$(find "$BUILD/cmake" -name 'libarmquant_ort*.so' | head -1)
    [ -n "$LIB" ] && "$PY" -c "import ctypes,sys; sys.exit(0 if ctypes.CDLL('$LIB').armq_has_cuda() == 1 else 1)" \
      || { say "CMake build has no CUDA kernel (armq_has_cuda() != 1)"; LIB=""; }
  else
    say "CMake build failed (last lines of $BUILD/cmake.log below); falling back to nvcc alone"
    tail -15 "$BUILD/cmake.log"
  fi
fi
if [ -z "$LIB" ]; then
  LIB="$BUILD/libarmquant_cuda.so"
  say "building $LIB with nvcc (sm_90 + PTX)"
  timeout 300 "$NVCC" -std=c++17 -O3 -Xcompiler -fPIC --shared -Werror all-warnings \
    -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
    -o "$LIB" export/cuda/arm_cuda.cu || fail "nvcc build of export/cuda/arm_cuda.cu failed"
fi
say "library: $LIB"
# armquant._native (the PyTorch binding) loads the full library only; the nvcc-alone build
# carries just the CUDA entry points, so the binding check is then skipped with a reason.
case "$LIB" in
  */libarmquant_ort*.so) export ARMQUANT_LIBRARY="$PWD/$LIB" ;;
  *) unset ARMQUANT_LIBRARY; export ARMQUANT_GPU_CHECK_STANDALONE=1 ;;
esac
timeout 420 "$PY" benchmarks/gpu_check.py --lib "$LIB" "$@"
rc=$?
[ $rc -eq 124 ] && say "ERROR: gpu_check.py ran past 420 s and was stopped"
exit $rc
