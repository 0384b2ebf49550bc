// The C ABI of armquant's native ARM kernels (docs/arm-op-spec.md).
//
// One shared library carries the CPU kernel, the CUDA kernel (when built with nvcc) and the
// ONNX Runtime custom-op registration. PyTorch reaches the kernels through this ABI with
// ctypes, ONNX Runtime through RegisterCustomOps; both therefore run the same code.
// Callers validate shapes and attributes; the kernels trust them.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { ARMQ_FLOAT32 = 0, ARMQ_FLOAT16 = 1, ARMQ_BFLOAT16 = 2 } armq_dtype;
typedef enum { ARMQ_MASK_NONE = 0, ARMQ_MASK_BOOL = 1, ARMQ_MASK_INT64 = 2 } armq_mask_type;
typedef enum { ARMQ_SCOPE_TENSOR = 0, ARMQ_SCOPE_SEQUENCE = 1, ARMQ_SCOPE_TOKEN = 2 } armq_scope;

typedef struct {
  float c, p1, k, pmin, pmax, kappa;  // float32, as ONNX stores float attributes
  int32_t share_fixed;                // 0: share "mad", 1: share "fixed"
  int32_t percentile_abs;             // 0: percentile_of "signed", 1: "abs"
  int32_t scope;                      // armq_scope
  uint64_t seed;                      // in [0, 2^63)
} armq_attrs;

// x, y: [B, S, I] of dtype; mask: [B, S] (or NULL with ARMQ_MASK_NONE);
// positions: [B, S] int64 (or NULL: position of token s is s). Returns 0 on success.
int armq_cpu_forward(armq_dtype dtype, const void* x, void* y, int64_t B, int64_t S, int64_t I,
                     const void* mask, armq_mask_type mask_type, const int64_t* positions,
                     const armq_attrs* attrs, int num_threads);

// Bytes of device scratch memory armq_cuda_forward needs for these sizes.
size_t armq_cuda_workspace_bytes(armq_dtype dtype, int64_t B, int64_t S, int64_t I,
                                 const armq_attrs* attrs);

// All pointers are device pointers; stream is a cudaStream_t. Enqueues work only: no host
// synchronisation, so it can be captured in a CUDA graph. Returns 0 or a cudaError_t value.
int armq_cuda_forward(armq_dtype dtype, const void* x, void* y, int64_t B, int64_t S, int64_t I,
                      const void* mask, armq_mask_type mask_type, const int64_t* positions,
                      const armq_attrs* attrs, void* workspace, size_t workspace_bytes,
                      void* stream);

// 1 when this build carries the CUDA kernel, else 0.
int armq_has_cuda(void);

// The vector paths the CPU kernel takes on this CPU: "avx512", "avx2" or "portable" (the
// same bits either way; $ARMQUANT_DISABLE_AVX512 and $ARMQUANT_DISABLE_AVX2 step down).
const char* armq_cpu_isa(void);

// Human-readable text for a nonzero return code.
const char* armq_error_string(int code);

#ifdef __cplusplus
}
#endif
