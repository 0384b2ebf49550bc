// What the library exports besides the kernels: error strings, the CUDA flag, a test hook.
#include <cstdio>

#include "arm_internal.h"

#ifndef ARMQ_WITH_CUDA
#define ARMQ_WITH_CUDA 0
#endif

// The CUDA sources may provide readable text for cudaError_t values; weak so that a CPU-only
// build links without them.
extern "C" const char* armq_cuda_error_string(int code) __attribute__((weak));

extern "C" int armq_has_cuda(void) { return ARMQ_WITH_CUDA; }

extern "C" const char* armq_error_string(int code) {
  switch (code) {
    case ARMQ_OK:
      return "success";
    case ARMQ_ERR_INVALID_ARGUMENT:
      return "invalid argument to the ARM kernel (shape, dtype, mask type or scope)";
    case ARMQ_ERR_OUT_OF_MEMORY:
      return "out of memory for the ARM kernel's scratch buffers";
    case ARMQ_ERR_NO_CUDA:
      return "this build of libarmquant_ort has no CUDA kernel (nvcc was not found when it was built)";
    case ARMQ_ERR_INTERNAL:
      return "internal error in the ARM kernel";
    default:
      break;
  }
  if (armq_cuda_error_string) return armq_cuda_error_string(code);
  return "CUDA error (no text available in this build)";
}

// Exposed for the known-answer tests of the random stream.
extern "C" void armq_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  armq::philox4x32_10(counter, key, out);
}

#if !ARMQ_WITH_CUDA
// Stubs: the library was built without nvcc.
extern "C" size_t armq_cuda_workspace_bytes(armq_dtype, int64_t, int64_t, int64_t, const armq_attrs*) { return 0; }

extern "C" int armq_cuda_forward(armq_dtype, const void*, void*, int64_t, int64_t, int64_t, const void*,
                                 armq_mask_type, const int64_t*, const armq_attrs*, void*, size_t, void*) {
  return ARMQ_ERR_NO_CUDA;
}
#endif
