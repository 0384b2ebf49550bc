// The ARM op on CUDA (docs/arm-op-spec.md; design notes in export/cuda/README.md).
//
// Every statistic is an order statistic or a count, found by radix select on order-preserving
// integer keys with histograms: no sort, no host synchronisation, no device to host copy, so
// armq_cuda_forward only enqueues kernels and can be captured in a CUDA graph.
//   row (groups of at most kRowMaxBytes): one block per group holds the group in shared memory,
//     selects every statistic there and writes the output; one launch, no workspace.
// Larger groups take one of two plans that share the final kernels:
//   hist16 (float16 / bfloat16, at most kMaxGroupsHist16 groups): one pass builds a 65536-bin
//     histogram of the raw bits per group; one block per group reads the median, the MAD, the
//     near-zero count, the threshold and the percentiles from it.
//   radix (any dtype, any number of groups): 8-bit digit passes over the data, a few select
//     queries per pass, per-group histograms and query state in the workspace.
// Then a tie-count pass, a per-group scan over chunks and the output pass, which takes the
// elements below the threshold plus the first `need` elements equal to it in flat-index order.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "arm_cuda_core.cuh"

namespace armq {
namespace {

constexpr int kThreads = 256;               // streaming kernels
constexpr int64_t kChunk = 32768;           // elements per block in streaming kernels
constexpr int kHist16Threads = 1024;
constexpr int64_t kHist16Chunk = 57344;     // 7 tiles of 8192; < 65536: 16-bit counters cannot overflow
static_assert(kHist16Chunk < 65536, "a hist16 block counts at most 65535 elements a bin");
constexpr int kAnalyzeThreads = 1024;
constexpr int kBins16 = 65536, kMags16 = 32768;
constexpr int kMagsPerThread = kMags16 / kAnalyzeThreads;  // 32
// Plan limits. tests/test_arm_cuda_sim.py builds with smaller ones to send small inputs through
// every plan.
#ifndef ARMQ_MAX_GROUPS_HIST16
#define ARMQ_MAX_GROUPS_HIST16 64
#endif
#ifndef ARMQ_ROW_MAX_BYTES
#define ARMQ_ROW_MAX_BYTES (64 * 1024)
#endif
constexpr int64_t kMaxGroupsHist16 = ARMQ_MAX_GROUPS_HIST16;  // 256 KiB of histogram per group
constexpr size_t kHist16Smem = kMags16 * sizeof(uint32_t);
constexpr size_t kAnalyzeSmem = (kMags16 + kMags16 / 32) * sizeof(uint32_t);  // padded
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kRowThreads = 512;
constexpr int64_t kRowMaxBytes = ARMQ_ROW_MAX_BYTES;  // row plan: a group's values fit in shared memory
constexpr size_t kRowSmemMax = kRowMaxBytes + kRowMaxBytes / 2 / 8;  // values + a validity bit each (16-bit)

enum KeyKind { KEY_ABS = 0, KEY_SIGNED = 1, KEY_DEV = 2 };
enum Phase { PHASE_STATS = 0, PHASE_MAD = 1, PHASE_T = 2 };

// Shapes and token inputs, as the kernels see them.
struct Problem {
  int64_t S, I;
  int64_t L;       // elements per group
  int64_t chunk;   // elements per block
  int64_t chunks;  // blocks per group
  const void* mask;
  int mask_type;
  const int64_t* positions;
  int aligned;  // x, y 16-byte aligned and every run starts at a multiple of the vector width
  int index32;  // every flat index fits in 32 bits: token and position need no 64-bit division
};

// Token of flat element j, and a token's position. 64-bit integer division is a long
// instruction sequence on the GPU; 32-bit division is a few.
__device__ __forceinline__ int64_t token_of(const Problem& P, int64_t j) {
  return P.index32 ? (int64_t)((uint32_t)j / (uint32_t)P.I) : j / P.I;
}

__device__ __forceinline__ int64_t position_of(const Problem& P, int64_t token) {
  if (P.positions) return P.positions[token];
  return P.index32 ? (int64_t)((uint32_t)token % (uint32_t)P.S) : token % P.S;
}

__device__ __forceinline__ bool token_valid(const Problem& P, int64_t token) {
  if (P.mask_type == ARMQ_MASK_BOOL) return static_cast<const uint8_t*>(P.mask)[token] != 0;
  if (P.mask_type == ARMQ_MASK_INT64) return static_cast<const int64_t*>(P.mask)[token] != 0;
  return true;
}

// One thread's run of up to VEC consecutive elements, loaded with one 16-byte access when it can.
template <class Tr>
struct Run {
  alignas(16) typename Tr::raw v[Tr::VEC];
  int count;
  unsigned valid;  // bit k: element k is valid (token kept by the mask, value finite)
};

// Loads only, so that a thread can put several loads in flight before using them.
template <class Tr>
__device__ __forceinline__ void fetch_run(const typename Tr::raw* x, const Problem& P, int64_t start,
                                          int64_t end, Run<Tr>& r) {
  int64_t left = end - start;
  r.count = left <= 0 ? 0 : (left < Tr::VEC ? (int)left : (int)Tr::VEC);
  if (P.aligned && r.count == Tr::VEC) {
    *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(x + start);
  } else {
#pragma unroll
    for (int k = 0; k < Tr::VEC; ++k) r.v[k] = k < r.count ? x[start + k] : typename Tr::raw(0);
  }
}

template <class Tr>
__device__ __forceinline__ void classify_run(const Problem& P, int64_t start, Run<Tr>& r) {
  r.valid = 0;
  if (r.count == 0) return;
  if (P.mask_type == ARMQ_MASK_NONE) {  // no division for the token index
#pragma unroll
    for (int k = 0; k < Tr::VEC; ++k)
      if (k < r.count && finite_f32(Tr::widen(r.v[k]))) r.valid |= 1u << k;
    return;
  }
  int64_t token = token_of(P, start), channel = start - token * P.I;
  bool keep = token_valid(P, token);
#pragma unroll
  for (int k = 0; k < Tr::VEC; ++k) {
    if (k < r.count) {
      if (channel == P.I) {
        channel = 0;
        keep = token_valid(P, ++token);
      }
      if (keep && finite_f32(Tr::widen(r.v[k]))) r.valid |= 1u << k;
      ++channel;
    }
  }
}

template <class Tr>
__device__ __forceinline__ void load_run(const typename Tr::raw* x, const Problem& P, int64_t start,
                                         int64_t end, Run<Tr>& r) {
  fetch_run<Tr>(x, P, start, end, r);
  classify_run<Tr>(P, start, r);
}

template <class Tr>
__device__ __forceinline__ void store_run(typename Tr::raw* y, const Problem& P, int64_t start,
                                          const Run<Tr>& r) {
  if (P.aligned && r.count == Tr::VEC) {
    *reinterpret_cast<uint4*>(y + start) = *reinterpret_cast<const uint4*>(r.v);
  } else {
#pragma unroll
    for (int k = 0; k < Tr::VEC; ++k)
      if (k < r.count) y[start + k] = r.v[k];
  }
}

// The element range of this block: chunk c of group g.
struct ChunkRange {
  int64_t g, begin, end;
};

__device__ __forceinline__ ChunkRange chunk_range_of(const Problem& P, int64_t chunk) {
  ChunkRange c;
  c.g = chunk / P.chunks;
  c.begin = c.g * P.L + (chunk - c.g * P.chunks) * P.chunk;
  c.end = min(c.begin + P.chunk, (c.g + 1) * P.L);
  return c;
}

__device__ __forceinline__ ChunkRange chunk_range(const Problem& P) { return chunk_range_of(P, blockIdx.x); }

template <class Tr>
__device__ __forceinline__ uint32_t query_key(int kind, typename Tr::raw v, float m) {
  if (kind == KEY_ABS) return Tr::key_abs(v);
  if (kind == KEY_SIGNED) return Tr::key_signed(v);
  return key_deviation(fabsf(Tr::widen(v)), m);
}

template <class Tr>
__device__ __forceinline__ float pool_value(uint32_t key, int percentile_abs) {
  return percentile_abs ? Tr::from_key_abs(key) : Tr::from_key_signed(key);
}

__device__ __forceinline__ u64 warp_inclusive_sum(u64 v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    u64 o = __shfl_up_sync(kFull, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

// Warp-wide select_digit over a 256-bin histogram (8 bins a lane): same result as the
// sequential select_digit in arm_cuda_core.cuh. All 32 lanes call it; every lane gets the result.
struct DigitPick {
  uint32_t digit, bucket;
  u64 rank;  // rank inside the chosen bucket
  bool ok;   // false when rank >= total (cannot happen with consistent counts)
};

__device__ __forceinline__ DigitPick warp_pick_digit(const uint32_t* hist, u64 rank, int lane) {
  uint32_t b[8];
  u64 sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    b[j] = hist[lane * 8 + j];
    sum += b[j];
  }
  u64 incl = warp_inclusive_sum(sum, lane), excl = incl - sum;
  unsigned ball = __ballot_sync(kFull, rank >= excl && rank < incl);
  DigitPick pick = {0, 0, 0, ball != 0};
  if (!pick.ok) return pick;
  int src = __ffs(ball) - 1;
  uint32_t digit = 0, bucket = 0;
  u64 left = rank - excl;
  if (lane == src) {
    for (int j = 0; j < 8; ++j) {
      if (left < b[j]) {
        digit = lane * 8 + j;
        bucket = b[j];
        break;
      }
      left -= b[j];
    }
  }
  pick.digit = __shfl_sync(kFull, digit, src);
  pick.bucket = __shfl_sync(kFull, bucket, src);
  pick.rank = __shfl_sync(kFull, left, src);
  return pick;
}

// --- radix plan -----------------------------------------------------------------------------

struct PassDesc {
  int nslots;
  int kind[3];
  int shift;
  int first;  // first pass of the statistics phase: also finds min x
};

// Queries with the same key and the same prefix share one histogram (v_lo and v_hi often do,
// and in the first pass every query of a key does): slot q reads the histogram of source(q).
__device__ __forceinline__ int hist_source(const PassDesc& pd, const uint32_t prefix[3], int q) {
  for (int p = 0; p < q; ++p)
    if (pd.kind[p] == pd.kind[q] && (pd.first || prefix[p] == prefix[q])) return p;
  return q;
}

// Histogram of the current digit for up to three select queries over the block's chunk.
template <class Tr>
__global__ void __launch_bounds__(kThreads)
    k_radix_hist(const typename Tr::raw* x, Problem P, GroupState* st, uint32_t* hist, PassDesc pd) {
  __shared__ uint32_t sh[3][256];
  __shared__ uint32_t warp_min[kThreads / 32];
  ChunkRange cr = chunk_range(P);
  const GroupState& s = st[cr.g];
  if (!pd.first && s.N == 0) return;  // nothing to select in this group (uniform per block)
  for (int i = threadIdx.x; i < 3 * 256; i += kThreads) (&sh[0][0])[i] = 0;
  uint32_t prefix[3] = {s.prefix[0], s.prefix[1], s.prefix[2]};
  bool counts[3];
#pragma unroll
  for (int q = 0; q < 3; ++q) counts[q] = q < pd.nslots && hist_source(pd, prefix, q) == q;
  float m = s.m;
  uint32_t min_key = 0xFFFFFFFFu;
  __syncthreads();
  for (int64_t base = cr.begin; base < cr.end; base += (int64_t)kThreads * Tr::VEC) {
    Run<Tr> r;
    int64_t start = base + (int64_t)threadIdx.x * Tr::VEC;
    load_run<Tr>(x, P, start, cr.end, r);
#pragma unroll
    for (int k = 0; k < Tr::VEC; ++k) {
      if (!(r.valid >> k & 1u)) continue;
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        if (!counts[q]) continue;
        uint32_t key = query_key<Tr>(pd.kind[q], r.v[k], m);
        if (prefix_matches(key, prefix[q], pd.shift)) atomicAdd(&sh[q][(key >> pd.shift) & 255u], 1u);
      }
      if (pd.first) min_key = min(min_key, Tr::key_signed(r.v[k]));
    }
  }
  __syncthreads();
  uint32_t* h = hist + cr.g * 3 * 256;
  for (int i = threadIdx.x; i < pd.nslots * 256; i += kThreads) {
    uint32_t v = (&sh[0][0])[i];
    if (v) atomicAdd(&h[i], v);
  }
  if (pd.first) {
    int lane = threadIdx.x & 31;
    for (int d = 16; d; d /= 2) min_key = min(min_key, __shfl_xor_sync(kFull, min_key, d));
    if (lane == 0) warp_min[threadIdx.x / 32] = min_key;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kThreads / 32; ++w) min_key = min(min_key, warp_min[w]);
      // Stored inverted so that the zeroed workspace is the identity of atomicMax.
      if (min_key != 0xFFFFFFFFu) atomicMax(&st[cr.g].mneg_key, ~min_key);
    }
  }
}

struct SelectDesc {
  int nslots;
  int shift;
  int phase;
  int first;  // first pass of the statistics phase: N and the ranks come from it
  int last;   // last digit: finish the phase
};

// One warp per group: picks the next digit of each query, clears the histograms for the next
// pass, and after the last digit turns the selected keys into the phase's statistics.
template <class Tr>
__global__ void __launch_bounds__(kThreads)
    k_radix_select(GroupState* st, uint32_t* hist, int64_t G, PassDesc pd, SelectDesc sd, armq_attrs at) {
  int lane = threadIdx.x & 31;
  int64_t g = (int64_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  if (g >= G) return;
  GroupState& s = st[g];
  uint32_t* h = hist + g * 3 * 256;
  u64 rank[3];
  if (sd.first) {
    u64 sum = 0;
    for (int j = 0; j < 8; ++j) sum += h[lane * 8 + j];
    for (int d = 16; d; d /= 2) sum += __shfl_xor_sync(kFull, sum, d);
    u64 N = sum;
    if (lane == 0) s.N = N;
    if (N == 0) {
      for (int q = 0; q < sd.nslots; ++q)
        for (int j = 0; j < 8; ++j) h[q * 256 + lane * 8 + j] = 0;
      return;
    }
    Percentile p = percentile_ranks(N, at.p1);
    rank[0] = median_rank(N);
    rank[1] = p.lo;
    rank[2] = p.hi;
  } else {
    if (s.N == 0) return;  // histograms stayed zero: the hist kernel skipped this group
    for (int q = 0; q < 3; ++q) rank[q] = s.rank_rem[q];
  }
  uint32_t prefix[3];
  for (int q = 0; q < 3; ++q) prefix[q] = sd.first ? 0u : s.prefix[q];
  DigitPick picks[3];
  for (int q = 0; q < sd.nslots; ++q) picks[q] = warp_pick_digit(h + hist_source(pd, prefix, q) * 256, rank[q], lane);
  __syncwarp();
  for (int q = 0; q < sd.nslots; ++q) {
    for (int j = 0; j < 8; ++j) h[q * 256 + lane * 8 + j] = 0;
    if (lane == 0 && picks[q].ok) {
      s.prefix[q] = prefix[q] | (picks[q].digit << sd.shift);
      s.rank_rem[q] = picks[q].rank;
      s.bucket[q] = picks[q].bucket;
    }
  }
  if (!sd.last || lane != 0) return;
  if (sd.phase == PHASE_STATS) {
    Percentile p = percentile_ranks(s.N, at.p1);
    s.m = Tr::from_key_abs(s.prefix[0]);
    s.qp = percentile_value(pool_value<Tr>(s.prefix[1], at.percentile_abs),
                            pool_value<Tr>(s.prefix[2], at.percentile_abs), p);
    s.mneg = fabsf(Tr::from_key_signed(~s.mneg_key));
    s.prefix[0] = 0;  // slot 0 now selects the MAD
    s.rank_rem[0] = median_rank(s.N);
  } else if (sd.phase == PHASE_MAD) {
    s.mad = f32_from_bits(s.prefix[0]);
    s.eps = eps_value(s.mad, at);
  } else {  // PHASE_T
    s.t_key = s.prefix[0];
    s.need = s.rank_rem[0] + 1;
    s.ties = s.bucket[0];
  }
}

// count(a < eps) over the block's chunk.
template <class Tr>
__global__ void __launch_bounds__(kThreads)
    k_count_near_zero(const typename Tr::raw* x, Problem P, GroupState* st) {
  typedef cub::BlockReduce<uint32_t, kThreads> Reduce;
  __shared__ typename Reduce::TempStorage tmp;
  ChunkRange cr = chunk_range(P);
  if (st[cr.g].N == 0) return;
  float eps = st[cr.g].eps;
  uint32_t count = 0;
  for (int64_t base = cr.begin; base < cr.end; base += (int64_t)kThreads * Tr::VEC) {
    Run<Tr> r;
    load_run<Tr>(x, P, base + (int64_t)threadIdx.x * Tr::VEC, cr.end, r);
#pragma unroll
    for (int k = 0; k < Tr::VEC; ++k)
      if ((r.valid >> k & 1u) && fabsf(Tr::widen(r.v[k])) < eps) ++count;
  }
  count = Reduce(tmp).Sum(count);
  if (threadIdx.x == 0 && count) atomicAdd(&st[cr.g].near_zero, (u64)count);
}

// n from the counts; slot 0 then selects the threshold t (rank n - 1 of a).
__global__ void k_moved_count(GroupState* st, int64_t G, armq_attrs at) {
  int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= G) return;
  GroupState& s = st[g];
  if (s.N == 0) {
    s.n = 0;
    return;
  }
  s.n = moved_count(s.N, s.near_zero, at);
  s.prefix[0] = 0;
  s.rank_rem[0] = s.n - 1;
}

// --- hist16 plan ----------------------------------------------------------------------------

// 65536-bin histogram of the raw bits of the valid elements, per group. Shared counters are
// 16 bits wide, two to a word (128 KiB, so one block an SM), so a block counts chunks of fewer
// than 65536 elements. Blocks are persistent, one an SM, each taking a run of consecutive
// chunks. Between chunks of one group only counters above kHist16Keep move to the group's
// histogram in global memory (the next chunk cannot overflow the others), so most bins are
// added there once a block rather than once a chunk; at the end of a group, all of them. The
// next chunk's first loads are issued before that flush, so that memory is busy while it runs.
constexpr uint32_t kHist16Keep = 65535 - (uint32_t)kHist16Chunk;

template <class Tr>
__global__ void __launch_bounds__(kHist16Threads)
    k_hist16(const typename Tr::raw* x, Problem P, int64_t chunks, uint32_t* hist) {
  constexpr int kTiles = (int)(kHist16Chunk / (kHist16Threads * Tr::VEC)), kBatch = 4;
  static_assert(kHist16Chunk % (kHist16Threads * Tr::VEC) == 0, "whole tiles a chunk");
  extern __shared__ uint4 smem16[];
  uint32_t* sh = reinterpret_cast<uint32_t*>(smem16);
  auto start_of = [&](const ChunkRange& cr, int tile) {
    return cr.begin + ((int64_t)tile * kHist16Threads + threadIdx.x) * Tr::VEC;
  };
  Run<Tr> runs[kBatch];
  const int64_t per_block = (chunks + gridDim.x - 1) / gridDim.x;
  int64_t chunk = blockIdx.x * per_block;
  const int64_t last = min(chunk + per_block, chunks);
  if (chunk >= last) return;  // uniform per block
  ChunkRange cr = chunk_range_of(P, chunk);
#pragma unroll
  for (int i = 0; i < kBatch; ++i) fetch_run<Tr>(x, P, start_of(cr, i), cr.end, runs[i]);
  for (int i = threadIdx.x; i < kMags16 / 4; i += kHist16Threads) smem16[i] = make_uint4(0, 0, 0, 0);
  __syncthreads();
  for (;;) {
    for (int i0 = 0; i0 < kTiles; i0 += kBatch) {  // runs holds tiles i0 .. i0 + kBatch - 1
      if (i0 > 0) {
#pragma unroll
        for (int i = 0; i < kBatch; ++i)
          if (i0 + i < kTiles) fetch_run<Tr>(x, P, start_of(cr, i0 + i), cr.end, runs[i]);
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (i0 + i >= kTiles) break;
        classify_run<Tr>(P, start_of(cr, i0 + i), runs[i]);
#pragma unroll
        for (int k = 0; k < Tr::VEC; ++k) {
          if (!(runs[i].valid >> k & 1u)) continue;
          uint32_t b = runs[i].v[k];
          atomicAdd(&sh[b >> 1], 1u << ((b & 1u) * 16));
        }
      }
    }
    __syncthreads();
    const int64_t next = chunk + 1;  // uniform per block
    ChunkRange next_cr = cr;
    if (next < last) {
      next_cr = chunk_range_of(P, next);
#pragma unroll
      for (int i = 0; i < kBatch; ++i) fetch_run<Tr>(x, P, start_of(next_cr, i), next_cr.end, runs[i]);
    }
    const uint32_t keep = next < last && next_cr.g == cr.g ? kHist16Keep : 0;
    uint32_t* h = hist + cr.g * kBins16;
    for (int w = threadIdx.x; w < kMags16; w += kHist16Threads) {
      const uint32_t v = sh[w];
      if (!v) continue;
      const uint32_t lo = (v & 0xFFFFu) > keep ? v & 0xFFFFu : 0, hi = (v >> 16) > keep ? v >> 16 : 0;
      if (lo) atomicAdd(&h[2 * w], lo);
      if (hi) atomicAdd(&h[2 * w + 1], hi);
      if (lo | hi) sh[w] = v - (lo | hi << 16);
    }
    if (next >= last) break;
    __syncthreads();
    chunk = next;
    cr = next_cr;
  }
}

// Bin b of the magnitude weights sits at b + b / 32 in shared memory, so that thread t reading
// its own 32 consecutive bins (33 t + j) meets no bank conflict.
__device__ __forceinline__ int padded(int b) { return b + (b >> 5); }

typedef cub::BlockScan<uint32_t, kAnalyzeThreads> AnalyzeScan;
typedef cub::BlockReduce<uint32_t, kAnalyzeThreads> AnalyzeReduce;

// Thread t owns bins [32 t, 32 t + 32) with exclusive prefix `excl` and sum `local`: if the
// rank-th unit of weight falls in them, return its bin and the weight below that bin.
template <class Weight>
__device__ __forceinline__ bool own_select(Weight weight, uint32_t excl, uint32_t local, u64 rank,
                                           uint32_t* bin, uint32_t* below) {
  if (rank < excl || rank >= (u64)excl + local) return false;
  const int first = threadIdx.x * kMagsPerThread;
  uint32_t w[kMagsPerThread];
#pragma unroll
  for (int j = 0; j < kMagsPerThread; ++j) w[j] = weight(first + j);  // weights in global memory: all loads at once
  uint32_t acc = excl;
#pragma unroll
  for (int j = 0; j < kMagsPerThread; ++j) {
    if (rank < (u64)acc + w[j]) {
      *bin = first + j;
      *below = acc;
      return true;
    }
    acc += w[j];
  }
  return false;
}

// One block per group: every statistic from the group's 65536-bin histogram.
template <class Tr>
__global__ void __launch_bounds__(kAnalyzeThreads)
    k_analyze16(const uint32_t* hist, GroupState* st, armq_attrs at) {
  extern __shared__ uint4 smem_an[];
  uint32_t* W = reinterpret_cast<uint32_t*>(smem_an);  // magnitude weights, padded
  __shared__ union {
    AnalyzeScan::TempStorage scan;
    AnalyzeReduce::TempStorage reduce;
  } tmp;
  __shared__ uint32_t dh[256];
  __shared__ uint32_t bins[4], belows[4];
  __shared__ uint32_t sel_prefix;
  __shared__ u64 sel_rank;
  __shared__ uint32_t shared_count;
  const int t = threadIdx.x, lane = t & 31;
  const int64_t g = blockIdx.x;
  const uint32_t* H = hist + g * kBins16;  // bin = raw bits; magnitudes b and b | 0x8000
#pragma unroll 8  // several loads in flight: this block runs alone on its SM for small G
  for (int j = 0; j < kMagsPerThread; ++j) {
    int b = j * kAnalyzeThreads + t;
    W[padded(b)] = H[b] + H[b + kMags16];
  }
  __syncthreads();
  auto mag_weight = [&](int b) { return W[padded(b)]; };
  uint32_t local = 0;
  for (int j = 0; j < kMagsPerThread; ++j) local += W[padded(t * kMagsPerThread + j)];
  uint32_t excl, N32;
  AnalyzeScan(tmp.scan).ExclusiveSum(local, excl, N32);
  const u64 N = N32;
  GroupState& s = st[g];
  if (N == 0) {
    if (t == 0) {
      s.N = 0;
      s.n = 0;
    }
    return;
  }
  const u64 r = median_rank(N);
  // Median of a.
  uint32_t bin, below;
  if (own_select(mag_weight, excl, local, r, &bin, &below)) bins[0] = bin;
  __syncthreads();
  const float m = Tr::from_key_abs(bins[0]);
  // MAD: radix select over the deviations of the bins, weighted by their counts.
  uint32_t prefix = 0;
  u64 rank = r;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (t < 256) dh[t] = 0;
    __syncthreads();
    // A thread's bins are consecutive, so their deviations are monotone on each side of m and
    // mostly share a digit: add runs of equal digits once, not every bin into the same counter.
    uint32_t run_digit = 0, run_weight = 0;
    for (int j = 0; j < kMagsPerThread; ++j) {
      int b = t * kMagsPerThread + j;
      uint32_t w = W[padded(b)];
      if (!w) continue;
      uint32_t key = key_deviation(Tr::from_key_abs(b), m);
      if (!prefix_matches(key, prefix, shift)) continue;
      uint32_t digit = (key >> shift) & 255u;
      if (run_weight && digit != run_digit) {
        atomicAdd(&dh[run_digit], run_weight);
        run_weight = 0;
      }
      run_digit = digit;
      run_weight += w;
    }
    if (run_weight) atomicAdd(&dh[run_digit], run_weight);
    __syncthreads();
    if (t < 32) {
      DigitPick pick = warp_pick_digit(dh, rank, lane);
      if (lane == 0) {
        sel_prefix = prefix | (pick.digit << shift);
        sel_rank = pick.rank;
      }
    }
    __syncthreads();
    prefix = sel_prefix;
    rank = sel_rank;
  }
  const float mad = f32_from_bits(prefix);
  const float eps = eps_value(mad, at);
  // count(a < eps)
  u64 near_zero = 0;
  if (!at.share_fixed) {
    uint32_t c = 0;
    for (int j = 0; j < kMagsPerThread; ++j) {
      int b = t * kMagsPerThread + j;
      if (Tr::from_key_abs(b) < eps) c += W[padded(b)];
    }
    __syncthreads();  // tmp is reused
    c = AnalyzeReduce(tmp.reduce).Sum(c);
    if (t == 0) shared_count = c;
    __syncthreads();
    near_zero = shared_count;
  }
  const u64 n = moved_count(N, near_zero, at);
  const Percentile p = percentile_ranks(N, at.p1);
  // Threshold t (rank n - 1 of a) and, for percentile_of "abs", v_lo and v_hi.
  if (own_select(mag_weight, excl, local, n - 1, &bin, &below)) {
    bins[1] = bin;
    belows[1] = below;
  }
  if (at.percentile_abs) {
    if (own_select(mag_weight, excl, local, p.lo, &bin, &below)) bins[2] = bin;
    if (own_select(mag_weight, excl, local, p.hi, &bin, &below)) bins[3] = bin;
  }
  // Signed order: the negative bins by decreasing magnitude (-0 included), then the positive
  // ones by increasing magnitude. min x, and v_lo, v_hi for percentile_of "signed".
  auto neg_weight = [&](int b) { return H[b + kMags16]; };
  auto pos_weight = [&](int b) { return W[padded(b)] - H[b + kMags16]; };
  uint32_t local_neg = 0;
#pragma unroll
  for (int j = 0; j < kMagsPerThread; ++j) local_neg += neg_weight(t * kMagsPerThread + j);
  uint32_t excl_neg, excl_pos, n_neg, n_pos;
  __syncthreads();
  AnalyzeScan(tmp.scan).ExclusiveSum(local_neg, excl_neg, n_neg);
  __syncthreads();
  AnalyzeScan(tmp.scan).ExclusiveSum(local - local_neg, excl_pos, n_pos);
  __shared__ float signed_values[3];  // rank 0, p.lo, p.hi
  u64 signed_ranks[3] = {0, p.lo, p.hi};
  for (int q = 0; q < 3; ++q) {
    u64 k = signed_ranks[q];
    if (k < n_neg) {
      if (own_select(neg_weight, excl_neg, local_neg, n_neg - 1 - k, &bin, &below))
        signed_values[q] = Tr::widen((typename Tr::raw)(bin | 0x8000u));
    } else {
      if (own_select(pos_weight, excl_pos, local - local_neg, k - n_neg, &bin, &below))
        signed_values[q] = Tr::widen((typename Tr::raw)bin);
    }
  }
  __syncthreads();
  if (t != 0) return;
  s.N = N;
  s.n = n;
  s.near_zero = near_zero;
  s.m = m;
  s.mad = mad;
  s.eps = eps;
  s.t_key = bins[1];
  s.need = n - belows[1];
  s.ties = W[padded(bins[1])];
  s.mneg = fabsf(signed_values[0]);
  if (at.percentile_abs)
    s.qp = percentile_value(Tr::from_key_abs(bins[2]), Tr::from_key_abs(bins[3]), p);
  else
    s.qp = percentile_value(signed_values[1], signed_values[2], p);
}

// --- row plan -------------------------------------------------------------------------------

// The pick of a radix select over a group held in shared memory.
struct RowPick {
  uint32_t key;     // the selected key
  uint32_t rank;    // rank of the selected element among the keys equal to it
  uint32_t bucket;  // how many valid keys equal it
};

// The key of rank `rank` (0-based, ascending) among the valid elements of the group in shared
// memory, 8 bits a pass. Every thread of the block calls it and gets the pick. The first pass's
// histogram (no prefix yet) depends on the key alone: it is built in `first` when `have_first`
// is false and reused as it stands when true, so selects of one key share it.
template <class Tr, class Key>
__device__ RowPick row_select(const typename Tr::raw* v, const uint32_t* valid, int L, Key key, int key_bits,
                              uint32_t rank, uint32_t* first, bool have_first, uint32_t* hist, RowPick* pick_out) {
  RowPick pick = {0, rank, 0};
  for (int shift = key_bits - 8; shift >= 0; shift -= 8) {
    const bool top = shift == key_bits - 8;
    uint32_t* h = top ? first : hist;
    if (!(top && have_first)) {
      if (threadIdx.x < 256) h[threadIdx.x] = 0;
      __syncthreads();
      for (int j = threadIdx.x; j < L; j += kRowThreads) {
        if (!(valid[j >> 5] >> (j & 31) & 1u)) continue;
        uint32_t k = key(v[j]);
        if (prefix_matches(k, pick.key, shift)) atomicAdd(&h[(k >> shift) & 255u], 1u);
      }
    }
    __syncthreads();  // the histogram is complete, and every thread has read the last pick
    if (threadIdx.x < 32) {
      DigitPick d = warp_pick_digit(h, pick.rank, threadIdx.x);
      if (threadIdx.x == 0) *pick_out = {pick.key | (d.digit << shift), (uint32_t)d.rank, d.bucket};
    }
    __syncthreads();
    pick = *pick_out;
  }
  return pick;
}

// One block per group of at most kRowMaxBytes: the group is read once into shared memory, every
// statistic comes from radix selects there, and the output is written from it. One launch, no
// workspace: the plan for small groups (decode steps, scope token), where the other plans' fixed
// costs (a 65536-bin histogram, or a pass over global memory per digit) would dominate.
template <class Tr>
__global__ void __launch_bounds__(kRowThreads)
    k_row(const typename Tr::raw* x, typename Tr::raw* y, Problem P, armq_attrs at) {
  typedef typename Tr::raw raw;
  typedef cub::BlockReduce<uint32_t, kRowThreads> Reduce;
  typedef cub::BlockScan<uint32_t, kRowThreads> Scan;
  extern __shared__ uint4 smem_row[];
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ uint32_t hist[256], first_abs[256], first_pool[256], warp_min[kRowThreads / 32], shared_u32;
  __shared__ RowPick pick_out;
  const int L = (int)P.L, t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int words = (L + 31) / 32;
  raw* v = reinterpret_cast<raw*>(smem_row);
  uint32_t* valid = reinterpret_cast<uint32_t*>(smem_row) + (L * (int)sizeof(raw) + 15) / 16 * 4;
  const int64_t begin = (int64_t)blockIdx.x * L;
  auto block_sum = [&](uint32_t c) {
    c = Reduce(tmp.reduce).Sum(c);
    if (t == 0) shared_u32 = c;
    __syncthreads();
    c = shared_u32;
    __syncthreads();  // tmp and shared_u32 are reused
    return c;
  };

  // The group's values go to shared memory in 16-byte pieces where alignment allows: loads with
  // no dependence between them, all in flight at once.
  const raw* xg = x + begin;
  raw* yg = y + begin;
  const bool vec = reinterpret_cast<uintptr_t>(xg) % 16 == 0 && reinterpret_cast<uintptr_t>(yg) % 16 == 0 &&
                   L * (int)sizeof(raw) % 16 == 0;  // uniform per block
  auto store_row = [&] {
    if (vec) {
      for (int i = t; i < L * (int)sizeof(raw) / 16; i += kRowThreads) reinterpret_cast<uint4*>(yg)[i] = smem_row[i];
    } else {
      for (int j = t; j < L; j += kRowThreads) yg[j] = v[j];
    }
  };
  if (vec) {
    for (int i = t; i < L * (int)sizeof(raw) / 16; i += kRowThreads) smem_row[i] = reinterpret_cast<const uint4*>(xg)[i];
  } else {
    for (int j = t; j < L; j += kRowThreads) v[j] = xg[j];
  }
  __syncthreads();
  // Which elements are valid: each warp takes words of 32 consecutive elements.
  uint32_t count = 0, min_key = 0xFFFFFFFFu;
  for (int w = warp; w < words; w += kRowThreads / 32) {  // uniform per warp
    const int j = w * 32 + lane;
    bool ok = false;
    if (j < L) {
      const raw r = v[j];
      ok = finite_f32(Tr::widen(r)) && (P.mask_type == ARMQ_MASK_NONE || token_valid(P, token_of(P, begin + j)));
      if (ok) min_key = min(min_key, Tr::key_signed(r));
    }
    const unsigned ball = __ballot_sync(kFull, ok);
    if (lane == 0) valid[w] = ball;
    count += ok;
  }
  for (int d = 16; d; d /= 2) min_key = min(min_key, __shfl_xor_sync(kFull, min_key, d));
  if (lane == 0) warp_min[warp] = min_key;
  const uint32_t N = block_sum(count);  // its barriers also publish valid and warp_min
  if (N == 0) {
    store_row();
    return;
  }
  for (int w = 0; w < kRowThreads / 32; ++w) min_key = min(min_key, warp_min[w]);

  // Statistics (spec steps 2 to 9), each select over the valid elements in shared memory.
  auto key_abs = [](raw r) { return Tr::key_abs(r); };
  const RowPick m_pick = row_select<Tr>(v, valid, L, key_abs, Tr::KEY_BITS, (uint32_t)median_rank(N), first_abs,
                                        false, hist, &pick_out);
  const float m = Tr::from_key_abs(m_pick.key);
  const Percentile p = percentile_ranks(N, at.p1);
  float qp;
  if (at.percentile_abs) {
    const uint32_t lo =
        row_select<Tr>(v, valid, L, key_abs, Tr::KEY_BITS, (uint32_t)p.lo, first_abs, true, hist, &pick_out).key;
    const uint32_t hi =
        row_select<Tr>(v, valid, L, key_abs, Tr::KEY_BITS, (uint32_t)p.hi, first_abs, true, hist, &pick_out).key;
    qp = percentile_value(Tr::from_key_abs(lo), Tr::from_key_abs(hi), p);
  } else {
    auto key_signed = [](raw r) { return Tr::key_signed(r); };
    const uint32_t lo =
        row_select<Tr>(v, valid, L, key_signed, Tr::KEY_BITS, (uint32_t)p.lo, first_pool, false, hist, &pick_out).key;
    const uint32_t hi =
        row_select<Tr>(v, valid, L, key_signed, Tr::KEY_BITS, (uint32_t)p.hi, first_pool, true, hist, &pick_out).key;
    qp = percentile_value(Tr::from_key_signed(lo), Tr::from_key_signed(hi), p);
  }
  const float mneg = fabsf(Tr::from_key_signed(min_key));
  auto key_dev = [m](raw r) { return key_deviation(fabsf(Tr::widen(r)), m); };  // first_pool is free again
  const float mad = f32_from_bits(
      row_select<Tr>(v, valid, L, key_dev, 32, (uint32_t)median_rank(N), first_pool, false, hist, &pick_out).key);
  const float eps = eps_value(mad, at);
  uint32_t near_zero = 0;
  if (!at.share_fixed) {
    uint32_t c = 0;
    for (int j = t; j < L; j += kRowThreads)
      if ((valid[j >> 5] >> (j & 31) & 1u) && fabsf(Tr::widen(v[j])) < eps) ++c;
    near_zero = block_sum(c);
  }
  const uint32_t n = (uint32_t)moved_count(N, near_zero, at);
  const RowPick t_pick = row_select<Tr>(v, valid, L, key_abs, Tr::KEY_BITS, n - 1, first_abs, true, hist, &pick_out);
  const uint32_t t_key = t_pick.key, need = t_pick.rank + 1;
  const bool partial = need < t_pick.bucket;

  // Selection and output: each thread takes a contiguous segment, so one scan ranks the ties.
  const int seg = (L + kRowThreads - 1) / kRowThreads, lo = min(L, t * seg), hi = min(L, lo + seg);
  uint32_t tie_rank = 0;
  if (partial) {
    uint32_t ties = 0, total;
    for (int j = lo; j < hi; ++j)
      if ((valid[j >> 5] >> (j & 31) & 1u) && Tr::key_abs(v[j]) == t_key) ++ties;
    Scan(tmp.scan).ExclusiveSum(ties, tie_rank, total);
  }
  for (int j = lo; j < hi; ++j) {
    if (!(valid[j >> 5] >> (j & 31) & 1u)) continue;
    const uint32_t key = Tr::key_abs(v[j]);
    bool selected = key < t_key;
    if (key == t_key) selected = !partial || tie_rank++ < need;
    if (!selected) continue;
    const int64_t flat = begin + j, token = token_of(P, flat);
    const float u = uniform((uint32_t)(flat - token * P.I), position_of(P, token), at.seed);
    v[j] = Tr::narrow(moved_value(Tr::widen(v[j]), u, qp, mneg));
  }
  __syncthreads();
  store_row();
}

// --- shared final kernels -------------------------------------------------------------------

__device__ __forceinline__ bool takes_some_ties(const GroupState& s) { return s.n > 0 && s.need < s.ties; }

// Elements equal to the threshold per chunk (only where the group takes some but not all).
template <class Tr>
__global__ void __launch_bounds__(kThreads)
    k_tie_count(const typename Tr::raw* x, Problem P, const GroupState* st, uint32_t* chunk_ties) {
  typedef cub::BlockReduce<uint32_t, kThreads> Reduce;
  __shared__ typename Reduce::TempStorage tmp;
  ChunkRange cr = chunk_range(P);
  const GroupState& s = st[cr.g];
  if (!takes_some_ties(s)) return;
  uint32_t t_key = s.t_key, count = 0;
  for (int64_t base = cr.begin; base < cr.end; base += (int64_t)kThreads * Tr::VEC) {
    Run<Tr> r;
    load_run<Tr>(x, P, base + (int64_t)threadIdx.x * Tr::VEC, cr.end, r);
#pragma unroll
    for (int k = 0; k < Tr::VEC; ++k)
      if ((r.valid >> k & 1u) && Tr::key_abs(r.v[k]) == t_key) ++count;
  }
  count = Reduce(tmp).Sum(count);
  if (threadIdx.x == 0) chunk_ties[blockIdx.x] = count;
}

// Exclusive scan of the tie counts over each group's chunks.
__global__ void __launch_bounds__(kThreads)
    k_tie_scan(const GroupState* st, const uint32_t* chunk_ties, u64* chunk_offset, int64_t chunks) {
  typedef cub::BlockScan<u64, kThreads> Scan;
  __shared__ typename Scan::TempStorage tmp;
  int64_t g = blockIdx.x;
  if (!takes_some_ties(st[g])) return;
  u64 running = 0;
  for (int64_t base = 0; base < chunks; base += kThreads) {
    int64_t i = base + threadIdx.x;
    u64 v = i < chunks ? chunk_ties[g * chunks + i] : 0, excl, total;
    Scan(tmp).ExclusiveSum(v, excl, total);
    if (i < chunks) chunk_offset[g * chunks + i] = running + excl;
    running += total;
    __syncthreads();
  }
}

// y: selected elements move to sign * (u * T); every other element is copied bit for bit.
// Each thread loads kBatch tiles before it uses any, so that enough loads are in flight to
// cover memory latency. Where the group takes some of its ties, one block scan per batch ranks
// them: the batch's per-tile tie counts are packed 16 bits a tile into one 64-bit value (a tile
// holds at most 2048 elements). Each warp queues its selected elements in shared memory and
// draws Philox for them with all lanes busy: drawing in place would run Philox for nearly every
// element, since some lane of a warp is almost always selected.
template <class Tr>
__global__ void __launch_bounds__(kThreads, 4)  // 64 registers: 4 blocks an SM, 64 KiB of loads in flight
    k_output(const typename Tr::raw* x, typename Tr::raw* y, Problem P, const GroupState* st,
             const u64* chunk_offset, uint64_t seed) {
  typedef cub::BlockScan<u64, kThreads> Scan;
  constexpr int kWarps = kThreads / 32, kWarpRun = 32 * Tr::VEC, kBatch = 4;
  constexpr int64_t kTile = (int64_t)kThreads * Tr::VEC;
  static_assert(kTile < 65536 && kBatch * 16 <= 64, "per-tile tie counts packed 16 bits a tile");
  __shared__ typename Scan::TempStorage tmp;
  __shared__ uint4 staged_words[kWarps][kWarpRun * sizeof(typename Tr::raw) / 16];  // 16-byte aligned
  __shared__ uint16_t queue[kWarps][kWarpRun];
  __shared__ int64_t run_token[kWarps][32], run_channel[kWarps][32], run_position[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  typename Tr::raw* staged = reinterpret_cast<typename Tr::raw*>(staged_words[warp]);
  ChunkRange cr = chunk_range(P);
  const GroupState& s = st[cr.g];
  const u64 n = s.n;
  const bool partial = takes_some_ties(s);  // uniform per block
  const uint32_t t_key = n ? s.t_key : 0;
  // Tie ranks are below the group's size, so 32 bits hold them (make_plan caps groups at 2^32).
  const uint32_t need = partial ? (uint32_t)s.need : 0;
  const float qp = s.qp, mneg = s.mneg;
  uint32_t tie_base = partial && P.chunks > 1 ? (uint32_t)chunk_offset[blockIdx.x] : 0;
  for (int64_t batch = cr.begin; batch < cr.end; batch += kBatch * kTile) {
    Run<Tr> runs[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i)
      fetch_run<Tr>(x, P, batch + i * kTile + (int64_t)threadIdx.x * Tr::VEC, cr.end, runs[i]);
    uint32_t tie_rank[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      classify_run<Tr>(P, batch + i * kTile + (int64_t)threadIdx.x * Tr::VEC, runs[i]);
      tie_rank[i] = 0;
    }
    if (partial) {
      u64 packed = 0, excl, total;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        u64 ties = 0;
#pragma unroll
        for (int k = 0; k < Tr::VEC; ++k)
          if ((runs[i].valid >> k & 1u) && Tr::key_abs(runs[i].v[k]) == t_key) ++ties;
        packed |= ties << (16 * i);
      }
      Scan(tmp).ExclusiveSum(packed, excl, total);
      __syncthreads();  // tmp is reused next batch
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        tie_rank[i] = tie_base + (uint32_t)(excl >> (16 * i) & 0xFFFFu);
        tie_base += (uint32_t)(total >> (16 * i) & 0xFFFFu);
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (batch + i * kTile >= cr.end) break;  // uniform per block
      Run<Tr>& r = runs[i];
      const int64_t start = batch + i * kTile + (int64_t)threadIdx.x * Tr::VEC;
      unsigned take = 0;
      if (n) {
#pragma unroll
        for (int k = 0; k < Tr::VEC; ++k) {
          if (!(r.valid >> k & 1u)) continue;
          uint32_t key = Tr::key_abs(r.v[k]);
          bool selected = key < t_key;
          if (key == t_key) selected = !partial || tie_rank[i]++ < need;
          if (selected) take |= 1u << k;
        }
      }
      if (__any_sync(kFull, take)) {  // warp-uniform
        int count = __popc(take), incl = count;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
          int o = __shfl_up_sync(kFull, incl, d);
          if (lane >= d) incl += o;
        }
        const int total = __shfl_sync(kFull, incl, 31);
        int slot = incl - count;
#pragma unroll
        for (int k = 0; k < Tr::VEC; ++k)
          if (take >> k & 1u) queue[warp][slot++] = (uint16_t)(lane * Tr::VEC + k);
        *reinterpret_cast<uint4*>(&staged[lane * Tr::VEC]) = *reinterpret_cast<const uint4*>(r.v);
        if (take) {
          const int64_t token = token_of(P, start);
          run_token[warp][lane] = token;
          run_channel[warp][lane] = start - token * P.I;
          run_position[warp][lane] = position_of(P, token);
        }
        __syncwarp();
        for (int q = lane; q < total; q += 32) {
          const int pos = queue[warp][q], src = pos / Tr::VEC;
          int64_t channel = run_channel[warp][src] + pos % Tr::VEC, position = run_position[warp][src];
          if (channel >= P.I) {  // the run crossed into a later token
            int64_t token = run_token[warp][src];
            while (channel >= P.I) {
              channel -= P.I;
              ++token;
            }
            position = position_of(P, token);
          }
          float u = uniform((uint32_t)channel, position, seed);
          staged[pos] = Tr::narrow(moved_value(Tr::widen(staged[pos]), u, qp, mneg));
        }
        __syncwarp();
        *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(&staged[lane * Tr::VEC]);
        __syncwarp();  // staged and queue are reused next tile
      }
      store_run<Tr>(y, P, start, r);
    }
  }
}

// --- host side ------------------------------------------------------------------------------

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

// Workspace layout; armq_cuda_workspace_bytes and armq_cuda_forward derive it the same way.
struct Plan {
  int64_t G, L, chunks, chunks16;
  bool row;     // every group fits in shared memory: k_row alone
  bool hist16;  // otherwise, 16-bit data in few groups: one 65536-bin histogram a group
  size_t row_smem;
  size_t off_hist, off_ties, off_offset, bytes;
};

Plan make_plan(armq_dtype dtype, int64_t B, int64_t S, int64_t I, const armq_attrs& at) {
  Plan p{};
  int64_t tokens = B * S;
  p.G = at.scope == ARMQ_SCOPE_TENSOR ? 1 : at.scope == ARMQ_SCOPE_SEQUENCE ? B : tokens;
  p.L = p.G ? tokens * I / p.G : 0;
  p.chunks = (p.L + kChunk - 1) / kChunk;
  p.chunks16 = (p.L + kHist16Chunk - 1) / kHist16Chunk;
  const int64_t elem = dtype == ARMQ_FLOAT32 ? 4 : 2;
  p.row = p.L > 0 && p.L * elem <= kRowMaxBytes;
  p.row_smem = (size_t)((p.L * elem + 15) / 16 * 16 + (p.L + 31) / 32 * 4);
  p.hist16 = !p.row && dtype != ARMQ_FLOAT32 && p.G <= kMaxGroupsHist16;
  size_t state = align_up(sizeof(GroupState) * (size_t)p.G);
  size_t hist = align_up(sizeof(uint32_t) * (size_t)p.G * (p.hist16 ? kBins16 : 3 * 256));
  size_t ties = align_up(sizeof(uint32_t) * (size_t)(p.G * p.chunks));
  size_t offset = align_up(sizeof(u64) * (size_t)(p.G * p.chunks));
  p.off_hist = state;
  p.off_ties = p.off_hist + hist;
  p.off_offset = p.off_ties + ties;
  p.bytes = p.off_offset + offset;
  return p;
}

// Once per device and dtype: opt the kernels that need it in to more than 48 KiB of shared
// memory (a function setting, not a stream operation; the first call, which in practice precedes
// any capture, does it), and read the SM count that sizes k_hist16's persistent grid.
template <class Tr>
cudaError_t device_setup(int* sms) {
  static bool done[64] = {};
  static int sm_count[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && done[device]) {
    *sms = sm_count[device];
    return cudaSuccess;
  }
  err = cudaFuncSetAttribute(k_row<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kRowSmemMax);
  if constexpr (Tr::KEY_BITS == 16) {
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(k_hist16<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kHist16Smem);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(k_analyze16<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kAnalyzeSmem);
  }
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (device < 64) {
    done[device] = true;
    sm_count[device] = *sms;
  }
  return cudaSuccess;
}

// Statistics from one 65536-bin histogram per group (16-bit dtypes, few groups).
template <class Tr>
cudaError_t enqueue_hist16(const typename Tr::raw* x, const Problem& P, const Plan& plan, GroupState* st,
                           uint32_t* hist, const armq_attrs& at, int sms, cudaStream_t stream) {
  Problem P16 = P;
  P16.chunk = kHist16Chunk;
  P16.chunks = plan.chunks16;
  const int64_t chunks = plan.G * plan.chunks16;
  k_hist16<Tr><<<(unsigned)(chunks < sms ? chunks : sms), kHist16Threads, kHist16Smem, stream>>>(x, P16, chunks, hist);
  k_analyze16<Tr><<<(unsigned)plan.G, kAnalyzeThreads, kAnalyzeSmem, stream>>>(hist, st, at);
  return cudaSuccess;
}

// Statistics by 8-bit radix-select passes over the data (any dtype, any number of groups).
template <class Tr>
cudaError_t enqueue_radix(const typename Tr::raw* x, const Problem& P, const Plan& plan, GroupState* st,
                          uint32_t* hist, const armq_attrs& at, cudaStream_t stream) {
  const int64_t G = plan.G;
  const unsigned blocks = (unsigned)(G * plan.chunks);
  const unsigned select_blocks = (unsigned)((G + kThreads / 32 - 1) / (kThreads / 32));
  const int pool = at.percentile_abs ? KEY_ABS : KEY_SIGNED;
  auto pass = [&](PassDesc pd, SelectDesc sd) {
    k_radix_hist<Tr><<<blocks, kThreads, 0, stream>>>(x, P, st, hist, pd);
    k_radix_select<Tr><<<select_blocks, kThreads, 0, stream>>>(st, hist, G, pd, sd, at);
  };
  for (int shift = Tr::KEY_BITS - 8; shift >= 0; shift -= 8) {  // m, v_lo, v_hi; min x
    int first = shift == Tr::KEY_BITS - 8;
    pass({3, {KEY_ABS, pool, pool}, shift, first}, {3, shift, PHASE_STATS, first, shift == 0});
  }
  for (int shift = 24; shift >= 0; shift -= 8)  // the MAD
    pass({1, {KEY_DEV, 0, 0}, shift, 0}, {1, shift, PHASE_MAD, 0, shift == 0});
  if (!at.share_fixed) k_count_near_zero<Tr><<<blocks, kThreads, 0, stream>>>(x, P, st);
  k_moved_count<<<(unsigned)((G + kThreads - 1) / kThreads), kThreads, 0, stream>>>(st, G, at);
  for (int shift = Tr::KEY_BITS - 8; shift >= 0; shift -= 8)  // the threshold t
    pass({1, {KEY_ABS, 0, 0}, shift, 0}, {1, shift, PHASE_T, 0, shift == 0});
  return cudaSuccess;
}

template <class Tr>
int forward(const void* xv, void* yv, int64_t S, int64_t I, const void* mask, armq_mask_type mask_type,
            const int64_t* positions, const armq_attrs& at, const Plan& plan, char* ws,
            cudaStream_t stream) {
  typedef typename Tr::raw raw;
  const raw* x = static_cast<const raw*>(xv);
  raw* y = static_cast<raw*>(yv);
  GroupState* st = reinterpret_cast<GroupState*>(ws);
  uint32_t* hist = reinterpret_cast<uint32_t*>(ws + plan.off_hist);
  uint32_t* chunk_ties = reinterpret_cast<uint32_t*>(ws + plan.off_ties);
  u64* chunk_offset = reinterpret_cast<u64*>(ws + plan.off_offset);

  Problem P;
  P.S = S;
  P.I = I;
  P.L = plan.L;
  P.chunk = kChunk;
  P.chunks = plan.chunks;
  P.mask = mask;
  P.mask_type = mask ? (int)mask_type : (int)ARMQ_MASK_NONE;
  P.positions = positions;
  P.aligned = plan.L % Tr::VEC == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(y) % 16 == 0;
  P.index32 = plan.G * plan.L < (int64_t(1) << 32);
  const unsigned blocks = (unsigned)(plan.G * plan.chunks);

  int sms = 0;
  cudaError_t err = device_setup<Tr>(&sms);
  if (err != cudaSuccess) return err;
  if (plan.row) {
    k_row<Tr><<<(unsigned)plan.G, kRowThreads, plan.row_smem, stream>>>(x, y, P, at);
    return cudaGetLastError();
  }
  // Zero the group states and histograms (the tie buffers are written before they are read).
  err = cudaMemsetAsync(ws, 0, plan.off_ties, stream);
  if (err != cudaSuccess) return err;
  if constexpr (Tr::KEY_BITS == 16) {
    err = plan.hist16 ? enqueue_hist16<Tr>(x, P, plan, st, hist, at, sms, stream)
                      : enqueue_radix<Tr>(x, P, plan, st, hist, at, stream);
  } else {
    err = enqueue_radix<Tr>(x, P, plan, st, hist, at, stream);
  }
  if (err != cudaSuccess) return err;
  if (plan.chunks > 1) {  // ties before this block's chunk; one chunk a group needs no offsets
    k_tie_count<Tr><<<blocks, kThreads, 0, stream>>>(x, P, st, chunk_ties);
    k_tie_scan<<<(unsigned)plan.G, kThreads, 0, stream>>>(st, chunk_ties, chunk_offset, plan.chunks);
  }
  k_output<Tr><<<blocks, kThreads, 0, stream>>>(x, y, P, st, chunk_offset, at.seed);
  return cudaGetLastError();
}

}  // namespace
}  // namespace armq

extern "C" {

size_t armq_cuda_workspace_bytes(armq_dtype dtype, int64_t B, int64_t S, int64_t I, const armq_attrs* attrs) {
  return armq::make_plan(dtype, B, S, I, *attrs).bytes;
}

int armq_cuda_forward(armq_dtype dtype, const void* x, void* y, int64_t B, int64_t S, int64_t I,
                      const void* mask, armq_mask_type mask_type, const int64_t* positions,
                      const armq_attrs* attrs, void* workspace, size_t workspace_bytes, void* stream) {
  if (B <= 0 || S <= 0 || I <= 0) return cudaSuccess;  // nothing to do
  armq::Plan plan = armq::make_plan(dtype, B, S, I, *attrs);
  // Counts are 32-bit per group and grids are one-dimensional.
  if (plan.L >= (int64_t(1) << 32) || plan.G * plan.chunks >= (int64_t(1) << 31) ||
      workspace_bytes < plan.bytes || workspace == nullptr)
    return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  switch (dtype) {
    case ARMQ_FLOAT32:
      return armq::forward<armq::F32>(x, y, S, I, mask, mask_type, positions, *attrs, plan, ws, s);
    case ARMQ_FLOAT16:
      return armq::forward<armq::F16>(x, y, S, I, mask, mask_type, positions, *attrs, plan, ws, s);
    case ARMQ_BFLOAT16:
      return armq::forward<armq::BF16>(x, y, S, I, mask, mask_type, positions, *attrs, plan, ws, s);
  }
  return cudaErrorInvalidValue;
}

// Text for the cudaError_t values armq_cuda_forward returns (armq_error_string asks for it).
const char* armq_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

#ifndef ARMQ_WITH_CUDA
// Built alone with nvcc (benchmarks/gpu_check.sh without the CMake project); the library build
// defines armq_has_cuda in export/cpu/arm_common.cc.
int armq_has_cuda(void) { return 1; }
#endif

}  // extern "C"
