// Runs the CUDA kernels of arm_cuda.cu on the CPU, for tests on machines without a GPU
// (tests/test_arm_cuda_sim.py). Not part of the library.
//
// Each block's threads are fibers (ucontext) on one OS thread. A fiber runs until it reaches a
// barrier: __syncthreads waits for every live thread of the block, __syncwarp and the warp
// collectives (__shfl*_sync, __any_sync, __ballot_sync) for the 32 lanes of the warp, which must
// all be alive, since the kernels pass the full mask; a thread that has returned may not leave
// the others at a __syncthreads. Threads run in a shuffled order, a warp whose lanes all meet
// runs on at once ahead of the rest of the block, and blocks run in a shuffled order, so that a
// kernel which relies on an order CUDA does not promise is likely to fail. A barrier that can
// never be released (a __syncthreads some threads skip, a warp collective in divergent code)
// stops the launch and is reported by armq_sim_error, as is any launch larger than the GPU allows.
//
// What it cannot see: races between threads that the fiber order happens to hide, and anything
// about speed. Built with -fsanitize=address (the tests do), it also catches out-of-bounds
// accesses to global and dynamic shared memory; not to static __shared__ arrays, which sit in a
// section of their own.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

// --- the CUDA runtime surface the kernels use --------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a static is the block's shared copy. They all go to one section,
// which the launch fills with a pattern before each block: CUDA's shared memory starts undefined,
// and a kernel must not find the previous block's values there.
#define __shared__ static __attribute__((section("armq_sim_shared")))
extern "C" char __start_armq_sim_shared[] __attribute__((weak));
extern "C" char __stop_armq_sim_shared[] __attribute__((weak));

namespace sim {

constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // sm_90's opt-in limit
constexpr size_t kStackBytes = 64 * 1024;

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  dim3 thread_idx;
  Wait wait = Wait::kNone;
};

struct State {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  Fiber* current = nullptr;
  std::function<void()> body;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<uint4> dynamic_shared;  // uint4: 16-byte aligned
  uint64_t warp_slots[kMaxThreads / 32][32];
  std::string error;
  std::vector<unsigned> order;  // this round's thread order
  size_t position = 0;          // the running thread's place in it
  std::mt19937 rng{12345};
  std::vector<std::pair<const void*, size_t>> shared_limits;  // set by cudaFuncSetAttribute
};

constexpr size_t kDefaultDynamicShared = 48 * 1024;

// Internal linkage: as an inline function its static would be one object (STB_GNU_UNIQUE) shared
// by every simulator library loaded in the process, errors included.
static State& state() {
  static State s;
  return s;
}

inline void fail(const std::string& message) {
  if (state().error.empty()) state().error = message;
}

// Passes control to the next thread of this round that can run, or back to the scheduler.
inline void yield_from(ucontext_t* from) {
  State& s = state();
  while (++s.position < s.order.size()) {
    Fiber& f = s.fibers[s.order[s.position]];
    if (f.wait == Wait::kNone) {
      s.current = &f;
      swapcontext(from, &f.context);
      return;
    }
  }
  swapcontext(from, &s.scheduler);
}

inline void entry() {
  state().body();
  Fiber* f = state().current;
  f->wait = Wait::kDone;
  yield_from(&f->context);
}

inline void wait_at(Wait kind) {
  State& s = state();
  Fiber* f = s.current;
  f->wait = kind;
  if (kind == Wait::kWarp) {
    // The warp's last lane releases it, and the warp runs on at once, ahead of threads of other
    // warps that have not run yet this round: warps are not in step, and a kernel must not
    // behave as if they were.
    unsigned first = f->thread_idx.x & ~31u, at_warp = 0;
    for (unsigned l = 0; l < 32 && first + l < s.fibers.size(); ++l) at_warp += s.fibers[first + l].wait == Wait::kWarp;
    if (at_warp == 32) {
      unsigned lanes[32];
      for (unsigned l = 0; l < 32; ++l) {
        s.fibers[first + l].wait = Wait::kNone;
        lanes[l] = first + l;
      }
      std::shuffle(lanes, lanes + 32, s.rng);
      s.order.insert(s.order.begin() + (s.position + 1), lanes, lanes + 32);
    }
  }
  yield_from(&f->context);
}

// Runs one block to completion; false if it deadlocked (the reason is in state().error).
inline bool run_block(unsigned threads) {
  State& s = state();
  if (!s.stacks) s.stacks.reset(new char[kStackBytes * kMaxThreads]);
  s.fibers.assign(threads, Fiber());
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.thread_idx = dim3(t);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = s.stacks.get() + kStackBytes * t;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, entry, 0);
  }
  for (;;) {
    // One round: every thread that can run does, in a new order, until it waits or ends.
    s.order.resize(threads);
    for (unsigned t = 0; t < threads; ++t) s.order[t] = t;
    std::shuffle(s.order.begin(), s.order.end(), s.rng);
    s.position = (size_t)-1;
    yield_from(&s.scheduler);
    // Everyone now waits or is done: release what can be released.
    unsigned live = 0, at_block = 0;
    for (const Fiber& f : s.fibers) {
      live += f.wait != Wait::kDone;
      at_block += f.wait == Wait::kBlock;
    }
    if (live == 0) return true;
    if (at_block == live) {
      if (live < threads) {  // hardware may hang or go on; either way the kernel is wrong
        fail("__syncthreads in block " + std::to_string(s.block_idx.x) + " reached by " + std::to_string(live) +
             " threads while " + std::to_string(threads - live) + " have exited: a barrier in divergent code");
        return false;
      }
      for (Fiber& f : s.fibers)
        if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
      continue;
    }
    // Warps are released by their last lane (wait_at), so a warp still waiting here never will be.
    fail("deadlock in block " + std::to_string(s.block_idx.x) + ": " + std::to_string(at_block) + " of " +
         std::to_string(live) + " live threads at __syncthreads, the rest at a warp collective that not all "
         "32 lanes reach");
    return false;
  }
}

struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  Launch(dim3 g, dim3 b, size_t shared = 0, cudaStream_t = nullptr) : grid(g), block(b), shared_bytes(shared) {}

  template <class Kernel, class... Args>
  void operator()(Kernel kernel, Args... args) {
    State& s = state();
    if (!s.error.empty()) return;
    if (block.x == 0 || block.x > (unsigned)kMaxThreads || block.x % 32 != 0 || block.y != 1 || block.z != 1 ||
        grid.x == 0 || grid.y != 1 || grid.z != 1) {
      fail("bad launch: grid " + std::to_string(grid.x) + ", block " + std::to_string(block.x));
      return;
    }
    size_t limit = kDefaultDynamicShared;
    for (const auto& l : s.shared_limits)
      if (l.first == reinterpret_cast<const void*>(kernel)) limit = l.second;
    if (shared_bytes > limit) {
      fail("launch asks for " + std::to_string(shared_bytes) + " bytes of dynamic shared memory; the limit is " +
           std::to_string(limit) + " (cudaFuncSetAttribute raises it)");
      return;
    }
    s.grid_dim = grid;
    s.block_dim = block;
    s.body = [&] { kernel(args...); };
    std::vector<unsigned> blocks(grid.x);
    for (unsigned b = 0; b < grid.x; ++b) blocks[b] = b;
    std::shuffle(blocks.begin(), blocks.end(), s.rng);
    for (unsigned b : blocks) {
      s.block_idx = dim3(b);
      // CUDA leaves shared memory undefined: fill it with a pattern a kernel must overwrite.
      if (__start_armq_sim_shared != nullptr)
        memset(__start_armq_sim_shared, 0xA5, (size_t)(__stop_armq_sim_shared - __start_armq_sim_shared));
      s.dynamic_shared.assign((shared_bytes + 15) / 16, make_uint4(0xA5A5A5A5u, 0xA5A5A5A5u, 0xA5A5A5A5u, 0xA5A5A5A5u));
      if (!run_block(block.x)) return;
    }
  }
};

inline void* dynamic_shared() { return state().dynamic_shared.data(); }
inline const dim3& thread_idx() { return state().current->thread_idx; }
inline unsigned lane() { return state().current->thread_idx.x & 31u; }

// Every lane posts a value, all 32 meet, each reads what it needs, and all meet again before
// the slots can be reused.
template <class T, class Pick>
T exchange(T v, Pick pick) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp exchange of at most 8 bytes");
  State& s = state();
  uint64_t* slots = s.warp_slots[thread_idx().x / 32];
  uint64_t raw = 0;
  memcpy(&raw, &v, sizeof v);
  slots[lane()] = raw;
  wait_at(Wait::kWarp);
  T out = pick(slots);
  wait_at(Wait::kWarp);
  return out;
}

template <class T>
T slot_value(const uint64_t* slots, unsigned l) {
  T v;
  memcpy(&v, &slots[l & 31u], sizeof v);
  return v;
}

inline void require_full(unsigned mask) {
  if (mask != 0xFFFFFFFFu) fail("warp collective with a partial mask: the simulator supports the full mask only");
}

}  // namespace sim

#define threadIdx (::sim::thread_idx())
#define blockIdx (::sim::state().block_idx)
#define blockDim (::sim::state().block_dim)
#define gridDim (::sim::state().grid_dim)

inline void __syncthreads() { sim::wait_at(sim::Wait::kBlock); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  sim::require_full(mask);
  sim::wait_at(sim::Wait::kWarp);
}

template <class T>
T __shfl_sync(unsigned mask, T v, int src) {
  sim::require_full(mask);
  return sim::exchange(v, [&](const uint64_t* s) { return sim::slot_value<T>(s, (unsigned)src); });
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  sim::require_full(mask);
  unsigned l = sim::lane();
  return sim::exchange(v, [&](const uint64_t* s) { return l >= delta ? sim::slot_value<T>(s, l - delta) : v; });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  sim::require_full(mask);
  unsigned l = sim::lane();
  return sim::exchange(v, [&](const uint64_t* s) { return sim::slot_value<T>(s, l ^ (unsigned)lane_mask); });
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  sim::require_full(mask);
  return sim::exchange(predicate ? 1u : 0u, [](const uint64_t* s) {
    unsigned ball = 0;
    for (unsigned l = 0; l < 32; ++l) ball |= (unsigned)(s[l] & 1u) << l;
    return ball;
  });
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }

// One OS thread runs every fiber, so plain read-modify-writes are atomic.
template <class T>
T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  T old = *p;
  if (v > old) *p = v;
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
T max(T a, T b) {
  return a < b ? b : a;
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  memset(p, value, bytes);
  return cudaSuccess;
}
// Two SMs: few enough that persistent blocks loop over several chunks in the tests' shapes.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  if (attribute != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = 2;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || (size_t)value > sim::kMaxDynamicShared) return cudaErrorInvalidValue;
    sim::state().shared_limits.emplace_back(reinterpret_cast<const void*>(kernel), (size_t)value);
  }
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return sim::state().error.empty() ? cudaSuccess : cudaErrorLaunchFailure; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "simulated failure"; }

// For the test: the first failure since the last reset, or "".
extern "C" const char* armq_sim_error(void) { return sim::state().error.c_str(); }
extern "C" void armq_sim_reset(void) { sim::state().error.clear(); }
