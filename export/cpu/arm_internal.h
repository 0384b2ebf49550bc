// Internals shared by the CPU kernel, the error strings and the ONNX Runtime op.
#pragma once
#include <cstddef>
#include <cstdint>

#include "arm_kernel.h"

// Return codes of our own; CUDA failures keep their cudaError_t value (all below 10000).
enum {
  ARMQ_OK = 0,
  ARMQ_ERR_INVALID_ARGUMENT = 10001,
  ARMQ_ERR_OUT_OF_MEMORY = 10002,
  ARMQ_ERR_NO_CUDA = 10003,
  ARMQ_ERR_INTERNAL = 10004,
};

namespace armq {

// Philox4x32-10 (Random123 / cuRAND round function), the spec's random stream.
void philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);
uint32_t philox4x32_10_w0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1);
// The vector paths the CPU kernel takes here: "avx512", "avx2" or "portable".
const char* cpu_isa();

// Threads to use when the caller passes num_threads <= 0.
int default_threads();

// Someone else's thread pool: run(context, fn, n, data) calls fn(data, i) for every i < n,
// possibly in parallel, and returns once all are done (or throws).
struct ParallelFor {
  void (*run)(void* context, void (*fn)(void* data, size_t i), size_t n, void* data);
  void* context;
};

// armq_cpu_forward, with its threads taken from parallel_for where it is not null.
int cpu_forward(armq_dtype dtype, const void* x, void* y, int64_t B, int64_t S, int64_t I, const void* mask,
                armq_mask_type mask_type, const int64_t* positions, const armq_attrs* attrs, int num_threads,
                const ParallelFor* parallel_for);

}  // namespace armq

// Exported for the known-answer tests of the random stream (not part of arm_kernel.h).
extern "C" void armq_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);
