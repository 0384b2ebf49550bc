// The ARM operator on the CPU, bit for bit as docs/arm-op-spec.md defines it.
//
// Per group (scope) we need order statistics of the valid values: the lower median m of |x|,
// the MAD (the same rank of |a - m|), the rank n-1 of |x| (the selection threshold) and two
// adjacent ranks of the percentile pool. Three strategies, all O(N):
//  - small groups (a token's channels, or a decode step): scratch keys of |x|, of |a - m| and of
//    x, each counted once by its top 11 bits; each rank is selected among its bucket's keys,
//    gathered when asked for. Groups are spread across threads.
//  - large float32 groups (from 2^20 elements; float16 from 2^20 to 2^22): a sample brackets every
//    statistic, one counting pass keeps the values inside the brackets and counts those
//    below, and each statistic is selected among the kept values when its rank falls inside
//    its bracket; else the next strategy runs. float16 values are read as their float32 bits.
//  - other large groups (a whole sequence or tensor): a 65536-bin histogram of the high 16
//    bits of the float bit patterns (which order like the values), then the exact values of
//    the few bins the statistics fall in, gathered in one more pass (16-bit dtypes need none:
//    each bin is one value). Each pass reads x in place and is split across threads.
// Selection takes all a < t plus the first (n - count(a < t)) elements with a == t in flat
// order, where t is the rank n-1 value of a: the spec's (a, flat index) order. The moves
// are queued per token and their Philox words drawn in batches. The hot loops have AVX-512
// and AVX2 versions, chosen at run time (cpu_isa); every version computes the same bits.
//
// Bit exactness: build with -ffp-contract=off (no fused multiply-add), float math in float32,
// the share and percentile in double, exactly in the spec's evaluation order.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#include "arm_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifdef __linux__
#include <sched.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace armq {
namespace {

// ---- dtypes ---------------------------------------------------------------------------

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

const float* half_table() {
  // Exact float value of every float16 bit pattern (widening is exact).
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) {
      uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
      float v;
      if (exp == 0) {
        v = std::ldexp(static_cast<float>(mant), -24);
      } else if (exp == 31) {
        v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
      } else {
        v = std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
      }
      t[h] = float_of(bits_of(v) | sign);
    }
    return t;
  }();
  return table.data();
}

// float32 -> float16, round to nearest even (values here are finite).
inline uint16_t half_from_float(float value) {
  uint32_t f = bits_of(value);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t out;
  if (f >= (143u << 23)) {  // >= 65536: overflow (or NaN/Inf)
    out = f > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {  // float16 subnormal or zero: let a float add round it
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = bits_of(float_of(f) + float_of(magic)) - magic;
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    out = f >> 13;
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

// float32 -> bfloat16, round to nearest even (values here are finite).
inline uint16_t bfloat_from_float(float value) {
  uint32_t u = bits_of(value);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// akey: an unsigned integer that orders like |x|.
// A 32-bit key splits into a high and a low 16-bit half; a 16-bit key is its own high half.
struct Float32 {
  using Raw = uint32_t;
  static constexpr bool kExactHigh = false;
  static float value(Raw r) { return float_of(r); }
  static Raw raw_of(float v) { return bits_of(v); }
  static bool finite(Raw r) { return (r & 0x7f800000u) != 0x7f800000u; }
  static uint32_t akey(Raw r) { return r & 0x7fffffffu; }
  static float from_akey(uint32_t k) { return float_of(k); }
  static bool negative(Raw r) { return r > 0x80000000u; }  // x < 0 for all but NaN: -0 is not
};

// Order-preserving keys of a 16-bit sign-magnitude float, shared by float16 and bfloat16;
// Self supplies value(Raw).
template <class Self>
struct SignMagnitude16 {
  using Raw = uint16_t;
  static constexpr bool kExactHigh = true;
  static uint32_t akey(Raw r) { return r & 0x7fffu; }
  static float from_akey(uint32_t k) { return Self::value(static_cast<Raw>(k)); }
  static bool negative(Raw r) { return r > 0x8000u; }  // x < 0 for all but NaN: -0 is not
};

struct Float16 : SignMagnitude16<Float16> {
  static float value(Raw r) { return half_table()[r]; }
  static Raw raw_of(float v) { return half_from_float(v); }
  static bool finite(Raw r) { return (r & 0x7c00u) != 0x7c00u; }
};

struct BFloat16 : SignMagnitude16<BFloat16> {
  static float value(Raw r) { return float_of(static_cast<uint32_t>(r) << 16); }
  static Raw raw_of(float v) { return bfloat_from_float(v); }
  static bool finite(Raw r) { return (r & 0x7f80u) != 0x7f80u; }
};

// ---- the parts of the spec shared by both strategies -----------------------------------

struct Problem {
  const void* x;
  void* y;
  int64_t B, S, I;
  const void* mask;
  armq_mask_type mask_type;
  const int64_t* positions;
  armq_attrs attrs;
};

inline bool token_valid(const Problem& p, int64_t token) {
  switch (p.mask_type) {
    case ARMQ_MASK_BOOL:
      return static_cast<const uint8_t*>(p.mask)[token] != 0;
    case ARMQ_MASK_INT64:
      return static_cast<const int64_t*>(p.mask)[token] != 0;
    default:
      return true;
  }
}

inline int64_t token_position(const Problem& p, int64_t token) {
  return p.positions ? p.positions[token] : token % p.S;
}

// Step 5-6: how many elements move, from N valid and count(a < eps).
inline int64_t moved_count(const armq_attrs& at, int64_t N, int64_t near_zero) {
  double frac;
  if (at.share_fixed) {
    frac = std::min(std::max(static_cast<double>(at.c), 0.0), 1.0);
  } else {
    frac = (static_cast<double>(at.k) * static_cast<double>(near_zero)) / static_cast<double>(N);
    frac = std::min(std::max(frac, static_cast<double>(at.pmin)), static_cast<double>(at.pmax));
  }
  double n = std::nearbyint(frac * static_cast<double>(N));  // half to even (default mode)
  if (n < 1.0) n = 1.0;
  return std::min(static_cast<int64_t>(n), N);
}

// Step 8: the ranks of the percentile pool that interpolation needs.
struct PercentileRanks {
  double h, lo;
  int64_t lo_index, hi_index;
};
inline PercentileRanks percentile_ranks(const armq_attrs& at, int64_t N) {
  PercentileRanks r;
  r.h = (static_cast<double>(N - 1) * static_cast<double>(at.p1)) / 100.0;
  r.lo = std::floor(r.h);
  r.lo_index = std::max<int64_t>(static_cast<int64_t>(r.lo), 0);
  r.hi_index = std::min<int64_t>(r.lo_index + 1, N - 1);
  return r;
}
inline float interpolate(const PercentileRanks& r, float v_lo, float v_hi) {
  const double lo = v_lo, hi = v_hi;
  return static_cast<float>(lo + (r.h - r.lo) * (hi - lo));
}

inline float epsilon(const armq_attrs& at, float mad) {
  const float scaled = at.kappa * mad;  // each product rounded to float32
  return scaled * at.c;
}

#if defined(__x86_64__) || defined(__i386__)
// The AVX2 paths, when the CPU has them; $ARMQUANT_DISABLE_AVX2 (any value) forces the
// portable code, so that tests can check it on any machine. Both compute the same bits.
bool use_avx2() {  // and F16C, which every CPU with AVX2 has
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           !std::getenv("ARMQUANT_DISABLE_AVX2");
  return avx2;
}
// The AVX-512 paths (F, BW, VL: Skylake-SP and Zen 4 on) replace the AVX2 ones where the CPU
// has them: twice the lanes per instruction, compares into masks and a compress instruction.
// $ARMQUANT_DISABLE_AVX512 (any value) keeps the AVX2 paths, for tests and A/B timings.
bool use_avx512() {
  static const bool avx512 = use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && !std::getenv("ARMQUANT_DISABLE_AVX512");
  return avx512;
}
#endif

// The Philox word w0 for counters (c0[j], c1, c2, 0) under one key, for j < n.
void philox_w0_scalar(const uint32_t* c0, size_t n, uint32_t c1, uint32_t c2, uint32_t k0, uint32_t k1,
                      uint32_t* out) {
  for (size_t j = 0; j < n; ++j) out[j] = philox4x32_10_w0(c0[j], c1, c2, 0u, k0, k1);
}

#if defined(__x86_64__) || defined(__i386__)
// Sixteen counters at a time: the selection pass moves a few percent of all elements, and the
// scalar round function would cost more than the rest of the pass. Each round's two products
// depend on the round before, so sixteen lanes (four independent chains) keep the multipliers
// busy where eight leave them waiting (17% faster alone); 24 or 32 spill registers and are slower.
__attribute__((target("avx2"))) void philox_w0_avx2(const uint32_t* c0_in, size_t n, uint32_t c1_in,
                                                     uint32_t c2_in, uint32_t k0_in, uint32_t k1_in,
                                                     uint32_t* out) {
  // Each 64-bit slot carries one lane in its low half: even lanes in one register, odd lanes
  // in another, so that a 32 x 32 -> 64-bit product needs no shuffling. The high halves
  // collect garbage that no multiply and no output ever reads.
  constexpr int kChains = 4;  // registers of four lanes: sixteen counters
  constexpr size_t kStep = 4 * kChains;
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  __m256i key0[10], key1[10];
  for (uint32_t round = 0, k0 = k0_in, k1 = k1_in; round < 10; ++round, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    key0[round] = _mm256_set1_epi64x(k0);
    key1[round] = _mm256_set1_epi64x(k1);
  }
  // Every lane shares c1, c2 and c3 (zero), so round 1's product of c2 and round 2's of c0 are
  // the same for all: computed once here.
  const uint64_t p1_first = uint64_t{0xCD9E8D57u} * c2_in;
  const __m256i c0_second = _mm256_set1_epi64x(static_cast<uint32_t>(p1_first >> 32) ^ c1_in ^ k0_in);
  const __m256i c1_second = _mm256_set1_epi64x(static_cast<uint32_t>(p1_first));
  const __m256i p0_second = _mm256_mul_epu32(c0_second, m0);
  const __m256i c2_third = _mm256_xor_si256(_mm256_srli_epi64(p0_second, 32), key1[1]);  // but for ^ c3, per lane
  size_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    __m256i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    for (int v = 0; v < kChains / 2; ++v) {
      const __m256i counters = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0_in + j + 8 * v));
      c0[2 * v] = counters;
      c0[2 * v + 1] = _mm256_srli_epi64(counters, 32);
    }
    for (int h = 0; h < kChains; ++h) {  // rounds 1 and 2
      const __m256i p0 = _mm256_mul_epu32(c0[h], m0);  // round 1 sets c2 = hi(p0) ^ k1, c3 = lo(p0)
      const __m256i p1 = _mm256_mul_epu32(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), key1[0]), m1);
      c0[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1_second), key0[1]);
      c1[h] = p1;
      c2[h] = _mm256_xor_si256(c2_third, p0);
      c3[h] = p0_second;
    }
    for (int round = 2; round < 10; ++round) {
      for (int h = 0; h < kChains; ++h) {
        const __m256i p1 = _mm256_mul_epu32(c2[h], m1);
        if (round < 9) {  // the last round's w0 needs no c2 or c3
          const __m256i p0 = _mm256_mul_epu32(c0[h], m0);
          c2[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[h]), key1[round]);
          c3[h] = p0;
        }
        c0[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[h]), key0[round]);
        c1[h] = p1;
      }
    }
    for (int v = 0; v < kChains / 2; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j + 8 * v),
                          _mm256_blend_epi32(c0[2 * v], _mm256_slli_epi64(c0[2 * v + 1], 32), 0xAA));
  }
  if (j < n) {  // the last few as one more padded step: the scalar rounds cost more
    uint32_t c0[kStep] = {0}, w[kStep];
    std::memcpy(c0, c0_in + j, (n - j) * sizeof(uint32_t));
    philox_w0_avx2(c0, kStep, c1_in, c2_in, k0_in, k1_in, w);
    std::memcpy(out + j, w, (n - j) * sizeof(uint32_t));
  }
}

// GCC 12's AVX-512 intrinsics read an _mm512_undefined_epi32() it then warns about
// (GCC bug 105593); the AVX-512 functions below silence that one warning.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// philox_w0_avx2 with eight lanes a register: thirty-two counters a step.
__attribute__((target("avx512f"))) void philox_w0_avx512(const uint32_t* c0_in, size_t n, uint32_t c1_in,
                                                         uint32_t c2_in, uint32_t k0_in, uint32_t k1_in,
                                                         uint32_t* out) {
  constexpr int kChains = 4;
  constexpr size_t kStep = 8 * kChains;
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  __m512i key0[10], key1[10];
  for (uint32_t round = 0, k0 = k0_in, k1 = k1_in; round < 10; ++round, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    key0[round] = _mm512_set1_epi64(k0);
    key1[round] = _mm512_set1_epi64(k1);
  }
  const uint64_t p1_first = uint64_t{0xCD9E8D57u} * c2_in;
  const __m512i c0_second = _mm512_set1_epi64(static_cast<uint32_t>(p1_first >> 32) ^ c1_in ^ k0_in);
  const __m512i c1_second = _mm512_set1_epi64(static_cast<uint32_t>(p1_first));
  const __m512i p0_second = _mm512_mul_epu32(c0_second, m0);
  const __m512i c2_third = _mm512_xor_si512(_mm512_srli_epi64(p0_second, 32), key1[1]);
  size_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    for (int v = 0; v < kChains / 2; ++v) {
      const __m512i counters = _mm512_loadu_si512(c0_in + j + 16 * v);
      c0[2 * v] = counters;
      c0[2 * v + 1] = _mm512_srli_epi64(counters, 32);
    }
    for (int h = 0; h < kChains; ++h) {
      const __m512i p0 = _mm512_mul_epu32(c0[h], m0);
      const __m512i p1 = _mm512_mul_epu32(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), key1[0]), m1);
      c0[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1_second, key0[1], 0x96);  // a ^ b ^ c
      c1[h] = p1;
      c2[h] = _mm512_xor_si512(c2_third, p0);
      c3[h] = p0_second;
    }
    for (int round = 2; round < 10; ++round) {
      for (int h = 0; h < kChains; ++h) {
        const __m512i p1 = _mm512_mul_epu32(c2[h], m1);
        if (round < 9) {
          const __m512i p0 = _mm512_mul_epu32(c0[h], m0);
          c2[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3[h], key1[round], 0x96);
          c3[h] = p0;
        }
        c0[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[h], key0[round], 0x96);
        c1[h] = p1;
      }
    }
    for (int v = 0; v < kChains / 2; ++v)
      _mm512_storeu_si512(out + j + 16 * v,
                          _mm512_mask_blend_epi32(0xAAAA, c0[2 * v], _mm512_slli_epi64(c0[2 * v + 1], 32)));
  }
  if (j < n) {
    uint32_t c0[kStep] = {0}, w[kStep];
    std::memcpy(c0, c0_in + j, (n - j) * sizeof(uint32_t));
    philox_w0_avx512(c0, kStep, c1_in, c2_in, k0_in, k1_in, w);
    std::memcpy(out + j, w, (n - j) * sizeof(uint32_t));
  }
}
#pragma GCC diagnostic pop
#endif

void philox_w0_batch(const uint32_t* c0, size_t n, uint32_t c1, uint32_t c2, uint32_t k0, uint32_t k1,
                     uint32_t* out) {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx512()) return philox_w0_avx512(c0, n, c1, c2, k0, k1, out);
  if (use_avx2()) return philox_w0_avx2(c0, n, c1, c2, k0, k1, out);
#endif
  philox_w0_scalar(c0, n, c1, c2, k0, k1, out);
}

// Step 10, batched per token: selected elements are queued, then their words drawn together.
template <class D>
class Mover {
 public:
  Mover(const Problem& p, float q_p, float m_neg) : p_(p), target_{q_p, -m_neg} {}

  void start_token(int64_t token) {
    flush();
    base_ = token * p_.I;
    const uint64_t pos = static_cast<uint64_t>(token_position(p_, token));
    c1_ = static_cast<uint32_t>(pos);
    c2_ = static_cast<uint32_t>(pos >> 32);
  }
  int64_t base() const { return base_; }
  // The selection loops fill the queue themselves (kBatch entries) and then set its size.
  uint32_t* channels() { return channel_; }
  float* values() { return x_; }
  size_t size() const { return size_; }
  void set_size(size_t size) { size_ = size; }
  // The Philox words of the queued entries (room for kBatch).
  void words(uint32_t* w) const {
    philox_w0_batch(channel_, size_, c1_, c2_, static_cast<uint32_t>(p_.attrs.seed),
                    static_cast<uint32_t>(p_.attrs.seed >> 32), w);
  }
  // The new value of an element whose Philox word is w, negative when x < 0 (zeros count as
  // positive). -(u * m_neg) == u * -m_neg exactly: rounding is symmetric in sign. The target
  // is looked up, not branched on: the signs come in no order.
  float moved(uint32_t w, bool negative) const { return (static_cast<float>(w >> 8) * 0x1p-24f) * target_[negative]; }

  void flush() {
    if (size_ == 0) return;
    uint32_t w[kBatch];
    words(w);
    typename D::Raw* y = static_cast<typename D::Raw*>(p_.y) + base_;
    for (size_t j = 0; j < size_; ++j) y[channel_[j]] = D::raw_of(moved(w[j], x_[j] < 0.0f));
    size_ = 0;
  }
  static constexpr size_t kBatch = 256;

 private:
  const Problem& p_;
  const float target_[2];  // of positive and of negative elements
  int64_t base_ = 0;
  uint32_t c1_ = 0, c2_ = 0;
  size_t size_ = 0;
  uint32_t channel_[kBatch];
  float x_[kBatch];
};

// The ties (a == t) in one thread's share of a group: how many it holds, and how many of
// them move (the earliest in flat order). present < 0: not counted.
struct TieShare {
  int64_t take = 0, present = -1;
};

// The statistics of one group that the selection pass needs.
struct Stats {
  int64_t n_valid = 0;
  float threshold = 0;       // t: the rank n-1 value of a
  int64_t tie_quota = 0;     // elements with a == t still to take (in flat order)
  int64_t ties = 0;          // valid elements with a == t (large groups)
  float q_p = 0, m_neg = 0;  // targets for positive and negative elements
};

// Thread shares of the ties, in the order of their chunks: the earliest take theirs first.
std::vector<TieShare> tie_shares(const std::vector<int64_t>& ties, int64_t quota) {
  std::vector<TieShare> shares(ties.size());
  for (size_t t = 0; t < ties.size(); ++t) {
    shares[t] = {std::min(ties[t], quota), ties[t]};
    quota -= shares[t].take;
  }
  return shares;
}

#if defined(__x86_64__) || defined(__i386__)
// For each 8-bit mask, the lanes it keeps, packed to the front: vector code compacts with it.
struct CompressTable {
  alignas(32) uint32_t lanes[256][8];
  CompressTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask & (1 << lane)) lanes[mask][k++] = lane;
      for (; k < 8; ++k) lanes[mask][k] = 0;
    }
  }
};
const CompressTable& compress_table() {
  static const CompressTable table;
  return table;
}

// Puts the queued moves (channels relative to channel0) into y, which the selection loop has
// already copied from x, and empties the queue. A stretch is short (kStretch elements at
// most), so the moves land in cache. (Writing large outputs around the cache instead, with
// non-temporal stores from a buffer, measured 5-10% slower on every shape and dtype.)
constexpr int64_t kStretch = 4096;
template <class D, class M>
__attribute__((target("avx2,f16c"))) void write_stretch(const typename D::Raw* x, typename D::Raw* y, uint32_t channel0,
                                                   M& mover) {
  alignas(32) uint32_t w[M::kBatch];
  mover.words(w);
  // Each element's sign is read back from x: cheaper here, for the few that move, than kept
  // for every lane in the selection loop.
  const uint32_t* channels = mover.channels();
  for (size_t q = 0; q < mover.size(); ++q) {
    const uint32_t j = channels[q] - channel0;
    const float moved = mover.moved(w[q], D::negative(x[j]));
    if constexpr (std::is_same<D, Float16>::value)  // one instruction, same rounding (to nearest even)
      y[j] = static_cast<uint16_t>(_cvtss_sh(moved, _MM_FROUND_TO_NEAREST_INT));
    else
      y[j] = D::raw_of(moved);
  }
  mover.set_size(0);
}

// The end of select_token_avx2 and select_token_avx512: elements [j, n) one at a time, then
// the last stretch's moves. Returns what is left of tie_quota.
template <class D, bool kAllTies, class M>
__attribute__((target("avx2,f16c"))) int64_t select_tail(const typename D::Raw* x, typename D::Raw* y, int64_t j,
                                                         int64_t n, uint32_t t_key, int64_t tie_quota, uint32_t channel0,
                                                         size_t queued, int64_t stretch_begin, M& mover) {
  uint32_t* channels = mover.channels();
  for (; j < n; ++j) {
    if (queued == M::kBatch || j - stretch_begin == kStretch) {
      mover.set_size(queued);
      write_stretch<D>(x, y, channel0, mover);
      stretch_begin = j;
      queued = 0;
    }
    y[j] = x[j];
    const uint32_t key = D::akey(x[j]);
    if (key < t_key || (key == t_key && (kAllTies || tie_quota > 0))) {
      if (!(key < t_key)) --tie_quota;
      channels[queued++] = channel0 + static_cast<uint32_t>(j);
    }
  }
  mover.set_size(queued);
  write_stretch<D>(x, y, channel0, mover);
  return tie_quota;
}

// |x| keys per AVX2 vector: eight float32 values (their bits without the sign) or sixteen
// float16 / bfloat16 ones (raw & 0x7fff); both order like |x|, NaN and Inf above every
// finite threshold.
template <class D>
struct KeyLanes {
  static constexpr int64_t kLanes = 16;
  static constexpr uint32_t kKeyMask = 0x7fffu;
  __attribute__((target("avx2"))) static __m256i splat(uint32_t key) {
    return _mm256_set1_epi16(static_cast<int16_t>(key));
  }
  __attribute__((target("avx2"))) static __m256i less(__m256i a, __m256i b) { return _mm256_cmpgt_epi16(b, a); }
  __attribute__((target("avx2"))) static __m256i equal(__m256i a, __m256i b) { return _mm256_cmpeq_epi16(a, b); }
  __attribute__((target("avx2"))) static unsigned bits(__m256i m) {  // lane masks -> bits in element order
    const unsigned b = static_cast<unsigned>(_mm256_movemask_epi8(_mm256_packs_epi16(m, _mm256_setzero_si256())));
    return (b & 0xffu) | ((b >> 8) & 0xff00u);
  }
};
template <>
struct KeyLanes<Float32> {
  static constexpr int64_t kLanes = 8;
  static constexpr uint32_t kKeyMask = 0x7fffffffu;
  __attribute__((target("avx2"))) static __m256i splat(uint32_t key) { return _mm256_set1_epi32(static_cast<int>(key)); }
  __attribute__((target("avx2"))) static __m256i less(__m256i a, __m256i b) { return _mm256_cmpgt_epi32(b, a); }
  __attribute__((target("avx2"))) static __m256i equal(__m256i a, __m256i b) { return _mm256_cmpeq_epi32(a, b); }
  __attribute__((target("avx2"))) static unsigned bits(__m256i m) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(m)));
  }
};

// select_token (below) with AVX2: no branch per element but the rare tie; the kept lanes are
// compacted into the mover's queue, eight at a time, and y is copied as x is read. t_key:
// the threshold's |x| key.
template <class D, bool kAllTies, class M>
__attribute__((target("avx2,popcnt"))) int64_t select_token_avx2(const typename D::Raw* x, typename D::Raw* y,
                                                                  int64_t n, int64_t first, uint32_t t_key,
                                                                  int64_t tie_quota, M& mover) {
  using Lanes = KeyLanes<D>;
  constexpr int64_t kBlock = 128;  // elements between checks of the queue's room
  static_assert(M::kBatch >= 2 * kBlock, "a block must fit in the queue");
  const CompressTable& table = compress_table();
  const __m256i key_mask = Lanes::splat(Lanes::kKeyMask), limit = Lanes::splat(t_key);
  const __m256i limit_after = Lanes::splat(t_key + 1);  // key < t_key + 1: key <= t_key (t is finite)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const uint32_t channel0 = static_cast<uint32_t>(first - mover.base());
  uint32_t* channels = mover.channels();
  size_t queued = mover.size();  // kept in a register: the queue is this loop's only state
  int64_t stretch_begin = 0, j = 0;  // the moves of y[stretch_begin, j) are still queued
  const int64_t vectors_end = n & ~(Lanes::kLanes - 1);
  while (j < vectors_end) {
    if (queued + kBlock > M::kBatch || j + kBlock - stretch_begin > kStretch) {
      mover.set_size(queued);
      write_stretch<D>(x, y, channel0, mover);
      stretch_begin = j;
      queued = 0;
    }
    // The channels of the first eight lanes at hand.
    __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(channel0 + j)), lanes);
    for (const int64_t stop = std::min(j + kBlock, vectors_end); j < stop; j += Lanes::kLanes) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), v);
      const __m256i key = _mm256_and_si256(v, key_mask);
      unsigned keep;
      if (kAllTies) {  // every key == t_key in this share moves
        keep = Lanes::bits(Lanes::less(key, limit_after));
      } else {
        keep = Lanes::bits(Lanes::less(key, limit));
        if (unsigned ties = Lanes::bits(Lanes::equal(key, limit))) {
          for (; ties && tie_quota > 0; ties &= ties - 1, --tie_quota) keep |= ties & (0u - ties);
        }
      }
      for (int64_t eight = 0; eight < Lanes::kLanes; eight += 8, keep >>= 8, index = _mm256_add_epi32(index, _mm256_set1_epi32(8))) {
        const unsigned part = keep & 0xffu;
        const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[part]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(channels + queued), _mm256_permutevar8x32_epi32(index, perm));
        queued += static_cast<size_t>(__builtin_popcount(part));
      }
    }
  }
  return select_tail<D, kAllTies>(x, y, j, n, t_key, tie_quota, channel0, queued, stretch_begin, mover);
}

#pragma GCC diagnostic push  // GCC bug 105593, as at philox_w0_avx512
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// select_token_avx2 with AVX-512: one register of sixteen float32 or thirty-two 16-bit
// values, its compares straight into a lane mask, and the kept lanes' channels compacted by
// one compress instruction per sixteen. (Compressed in a register and then stored: a compress
// straight to memory is microcoded and slow on Zen 4.)
template <class D, bool kAllTies, class M>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt,avx2,f16c"))) int64_t select_token_avx512(
    const typename D::Raw* x, typename D::Raw* y, int64_t n, int64_t first, uint32_t t_key, int64_t tie_quota,
    M& mover) {
  constexpr bool kHalf = sizeof(typename D::Raw) == 2;
  constexpr int64_t kLanes = 64 / sizeof(typename D::Raw), kBlock = 128;
  static_assert(M::kBatch >= 2 * kBlock, "a block must fit in the queue");
  const __m512i key_mask = kHalf ? _mm512_set1_epi16(0x7fff) : _mm512_set1_epi32(0x7fffffff);
  const __m512i limit = kHalf ? _mm512_set1_epi16(static_cast<int16_t>(t_key)) : _mm512_set1_epi32(static_cast<int>(t_key));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint32_t channel0 = static_cast<uint32_t>(first - mover.base());
  uint32_t* channels = mover.channels();
  size_t queued = mover.size();
  int64_t stretch_begin = 0, j = 0;
  const int64_t vectors_end = n & ~(kLanes - 1);
  while (j < vectors_end) {
    if (queued + kBlock > M::kBatch || j + kBlock - stretch_begin > kStretch) {
      mover.set_size(queued);
      write_stretch<D>(x, y, channel0, mover);
      stretch_begin = j;
      queued = 0;
    }
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(channel0 + j)), lanes);
    for (const int64_t stop = std::min(j + kBlock, vectors_end); j < stop; j += kLanes) {
      const __m512i v = _mm512_loadu_si512(x + j);
      _mm512_storeu_si512(y + j, v);
      const __m512i key = _mm512_and_si512(v, key_mask);  // below 2^31 (2^15): signed compares hold
      uint32_t keep;
      if (kAllTies) {  // every key == t_key in this share moves
        keep = kHalf ? _mm512_cmple_epi16_mask(key, limit) : _mm512_cmple_epi32_mask(key, limit);
      } else {
        keep = kHalf ? _mm512_cmplt_epi16_mask(key, limit) : _mm512_cmplt_epi32_mask(key, limit);
        if (uint32_t ties = kHalf ? _mm512_cmpeq_epi16_mask(key, limit) : _mm512_cmpeq_epi32_mask(key, limit)) {
          for (; ties && tie_quota > 0; ties &= ties - 1, --tie_quota) keep |= ties & (0u - ties);
        }
      }
      for (int64_t part = 0; part < kLanes; part += 16, keep >>= 16, index = _mm512_add_epi32(index, _mm512_set1_epi32(16))) {
        const __mmask16 lanes_kept = static_cast<__mmask16>(keep & 0xffffu);
        _mm512_storeu_si512(channels + queued, _mm512_maskz_compress_epi32(lanes_kept, index));
        queued += static_cast<size_t>(__builtin_popcount(lanes_kept));
      }
    }
  }
  return select_tail<D, kAllTies>(x, y, j, n, t_key, tie_quota, channel0, queued, stretch_begin, mover);
}
#pragma GCC diagnostic pop
#endif

// Copies flat elements [first, first + n) of one token from x to y and queues the selected
// ones: a < t, and a == t while tie_quota lasts. Returns what is left of tie_quota. NaN and
// Inf never compare below or equal to a finite t.
// all_ties: every a == t in the group's share at hand moves (tie_quota covers them all).
template <class D>
int64_t select_token(const typename D::Raw* x, typename D::Raw* y, int64_t n, int64_t first, float t,
                     int64_t tie_quota, bool all_ties, Mover<D>& mover) {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx512()) {
    const uint32_t t_key = D::akey(D::raw_of(t));
    return all_ties ? select_token_avx512<D, true>(x, y, n, first, t_key, tie_quota, mover)
                    : select_token_avx512<D, false>(x, y, n, first, t_key, tie_quota, mover);
  }
  if (use_avx2()) {
    const uint32_t t_key = D::akey(D::raw_of(t));  // t >= 0 is one of the group's values
    return all_ties ? select_token_avx2<D, true>(x, y, n, first, t_key, tie_quota, mover)
                    : select_token_avx2<D, false>(x, y, n, first, t_key, tie_quota, mover);
  }
#endif
  (void)all_ties;
  std::memcpy(y, x, n * sizeof(*x));
  // Every element is written to the queue's next slot, which only a selected one keeps: no
  // branch per element but the rare tie.
  uint32_t* channels = mover.channels();
  float* values = mover.values();
  size_t queued = mover.size();
  const uint32_t channel0 = static_cast<uint32_t>(first - mover.base());
  for (int64_t j = 0; j < n; ++j) {
    if (queued == Mover<D>::kBatch) {
      mover.set_size(queued);
      mover.flush();
      queued = 0;
    }
    const float v = D::value(x[j]);
    const float a = std::fabs(v);
    channels[queued] = channel0 + static_cast<uint32_t>(j);
    values[queued] = v;
    queued += a < t;
    if (a == t && tie_quota > 0) {
      --tie_quota;
      ++queued;
    }
  }
  mover.set_size(queued);
  return tie_quota;
}

// Copies flat elements [begin, end) to y and moves the selected ones: a < t, then the first
// tie_quota elements with a == t in flat order. With n_valid == 0 it only copies.
template <class D>
void select_and_move(const Problem& p, int64_t begin, int64_t end, const Stats& st, TieShare ties) {
  int64_t tie_quota = ties.take;
  const bool all_ties = ties.take == ties.present;
  using Raw = typename D::Raw;
  const Raw* x = static_cast<const Raw*>(p.x);
  if (st.n_valid == 0) {
    std::memcpy(static_cast<Raw*>(p.y) + begin, x + begin, (end - begin) * sizeof(Raw));
    return;
  }
  const float t = st.threshold;
  Mover<D> mover(p, st.q_p, st.m_neg);
  for (int64_t token = begin / p.I; token * p.I < end; ++token) {
    const int64_t first = std::max(begin, token * p.I), stop = std::min(end, (token + 1) * p.I);
    Raw* y = static_cast<Raw*>(p.y) + first;
    if (!token_valid(p, token)) {
      std::memcpy(y, x + first, (stop - first) * sizeof(Raw));
      continue;
    }
    mover.start_token(token);
    tie_quota = select_token<D>(x + first, y, stop - first, first, t, tie_quota, all_ties, mover);
  }
  mover.flush();
}

// Runs body(0), ..., body(threads - 1), body(0) on the calling thread. An exception in any of
// them (out of memory, or no thread to be had) is rethrown here once all have finished. The
// bodies run on the caller's pool where it lends one (ONNX Runtime's intra-op threads), else
// on OpenMP's team: in a PyTorch process that is torch's. Either way they share the workers
// that spin for a while after each op, instead of fighting them for cores. Inside someone
// else's OpenMP parallel region the bodies run one after another.
// The pool of the call in progress on this thread, when its caller lends one (ONNX Runtime).
thread_local const ParallelFor* lent_pool = nullptr;

template <class F>
void run_threads(int threads, F&& body) {
  threads = std::max(threads, 1);
  std::vector<std::exception_ptr> errors(threads);
  auto guarded = [&](int t) {
    try {
      body(t);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  using Guarded = decltype(guarded);
  if (threads > 1 && lent_pool) {
    lent_pool->run(
        lent_pool->context, [](void* data, size_t t) { (*static_cast<Guarded*>(data))(static_cast<int>(t)); },
        static_cast<size_t>(threads), &guarded);
  } else
#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) guarded(t);
  } else {
    for (int t = 0; t < threads; ++t) guarded(t);
  }
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(guarded, t);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  }
  guarded(0);
  for (auto& th : pool) th.join();
#endif
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// f(lo, hi) for the blocks of [.., end) that this thread takes from `next`, a block of
// `block` elements at a time, until none is left. The threads of a pass share one `next`:
// a core slowed by other work (a noisy neighbour, an efficiency core) takes fewer blocks
// instead of holding the others up at the end of the pass.
template <class F>
void take_blocks(std::atomic<int64_t>& next, int64_t end, int64_t block, F&& f) {
  for (int64_t lo = next.fetch_add(block); lo < end; lo = next.fetch_add(block)) f(lo, std::min(end, lo + block));
}

// ---- small groups: keys bucketed once per array, ranks selected within buckets ------------

// Per-worker scratch, allocated before the workers start.
struct Scratch {
  std::vector<float> vals;
  std::vector<uint32_t> akeys, keys, abs_buckets, buckets;  // keys, and KeyRanks' scratch for the |x| ranks and the others
  void reserve(int64_t n) {
    vals.reserve(n);
    akeys.reserve(n);
    keys.reserve(n);
    abs_buckets.reserve(2 * n + 16);
    buckets.reserve(2 * n + 16);
  }
};

struct KeyInterval {  // keys [lo, hi)
  uint32_t lo, hi;
  bool contains(uint32_t key) const { return key - lo < hi - lo; }
};

// keys_in one key at a time: the portable path, and the vector paths' tails.
inline size_t keys_in_scalar(const uint32_t* keys, size_t n, KeyInterval w, uint32_t* out) {
  size_t kept = 0;
  for (size_t j = 0; j < n; ++j) {
    out[kept] = keys[j];
    kept += w.contains(keys[j]);
  }
  return kept;
}

#if defined(__x86_64__) || defined(__i386__)
// The lanes of key in [lo, lo + span): key - lo < span as unsigned integers, compared signed
// with the sign bits flipped. span_flipped: span ^ 0x80000000 in every lane.
__attribute__((target("avx2"))) inline unsigned lanes_in_interval(__m256i key, __m256i lo, __m256i span_flipped) {
  const __m256i flip = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
  return static_cast<unsigned>(_mm256_movemask_ps(
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(span_flipped, _mm256_xor_si256(_mm256_sub_epi32(key, lo), flip)))));
}

// Appends to out (room for n + 8) the keys[j] (j < n) that lie in w, in order; returns how many.
// out may be keys itself: the write end never passes the read end.
__attribute__((target("avx2,popcnt"))) size_t keys_in_avx2(const uint32_t* keys, size_t n, KeyInterval w, uint32_t* out) {
  const CompressTable& table = compress_table();
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(w.lo));
  const __m256i span = _mm256_set1_epi32(static_cast<int>((w.hi - w.lo) ^ 0x80000000u));
  size_t kept = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    const unsigned mask = lanes_in_interval(key, lo, span);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kept), _mm256_permutevar8x32_epi32(key, perm));
    kept += static_cast<size_t>(__builtin_popcount(mask));
  }
  return kept + keys_in_scalar(keys + j, n - j, w, out + kept);
}

#pragma GCC diagnostic push  // GCC bug 105593, as at philox_w0_avx512
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// keys_in_avx2 sixteen keys at a time: an unsigned compare into a lane mask, vpcompressd.
__attribute__((target("avx512f,avx512vl,popcnt"))) size_t keys_in_avx512(const uint32_t* keys, size_t n, KeyInterval w,
                                                                         uint32_t* out) {
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(w.lo)), span = _mm512_set1_epi32(static_cast<int>(w.hi - w.lo));
  size_t kept = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i key = _mm512_loadu_si512(keys + j);
    const __mmask16 in = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(key, lo), span);
    _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(in, key));
    kept += static_cast<size_t>(__builtin_popcount(in));
  }
  return kept + keys_in_scalar(keys + j, n - j, w, out + kept);
}
#pragma GCC diagnostic pop
#endif

// The keys[j] (j < n) in w, in order, appended to out (room for n + 8); returns how many.
// out may be keys itself. The vector stores may write up to 16 slots past the last key kept
// (never past out + n).
inline size_t keys_in(const uint32_t* keys, size_t n, KeyInterval w, uint32_t* out) {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx512()) return keys_in_avx512(keys, n, w, out);
  if (use_avx2()) return keys_in_avx2(keys, n, w, out);
#endif
  return keys_in_scalar(keys, n, w, out);
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,popcnt"))) uint32_t kth_key_avx2(uint32_t* keys, size_t n, KeyInterval w, int64_t k,
                                                             size_t small);
#endif

// Order statistics of one array of keys: one counting pass buckets them by their top 11 bits;
// a rank is selected among its bucket's keys, which a vector pass gathers into scratch: a
// bucket (a quarter of an octave of float magnitudes) holds a few percent of the keys, and the
// pass costs less than scattering every key to its bucket. Keys below 2^31 (bits of
// non-negative floats) need half the buckets.
class KeyRanks {
 public:
  KeyRanks(const uint32_t* keys, int64_t n, bool below_2_31, uint32_t* scratch)
      : keys_(keys), n_(n), bins_(below_2_31 ? kBins / 2 : kBins), scratch_(scratch) {
    std::fill(count_, count_ + bins_, 0u);
    for (int64_t i = 0; i < n; ++i) ++count_[keys[i] >> kShift];
    // Sums of kBlock buckets, in loops the compiler vectorises: finding a rank's bucket then
    // walks blocks and one block's buckets, where a running sum over all the buckets was one
    // long chain of dependent adds.
    for (int b = 0; b < bins_ / kBlock; ++b) {
      uint32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) sum += count_[b * kBlock + i];
      block_[b] = sum;
    }
  }

  // The key of rank k (0-based, ascending; k < n).
  uint32_t at(int64_t k) {
    int64_t before = 0;
    int bin = 0;
    while (before + block_[bin / kBlock] <= k) before += block_[bin / kBlock], bin += kBlock;
    while (before + count_[bin] <= k) before += count_[bin++];
    if (bin != gathered_) {  // the last bucket gathered stays in scratch (the ranks asked for often share one)
      const uint32_t lo = static_cast<uint32_t>(bin) << kShift;
      keys_in(keys_, static_cast<size_t>(n_), {lo, lo + (1u << kShift)}, scratch_);  // the top bucket's end wraps to 0
      gathered_ = bin;
    }
#if defined(__x86_64__) || defined(__i386__)
    // Rounds of sixteenths on a copy (the bucket stays whole for the next rank): vector
    // compares, where nth_element on a hundred-odd keys mispredicted a branch for about every
    // other key and took a third of a token-scope call.
    if (use_avx2()) {
      uint32_t* copy = scratch_ + count_[bin] + 8;
      std::copy(scratch_, scratch_ + count_[bin], copy);
      const uint32_t lo = static_cast<uint32_t>(bin) << kShift;
      return kth_key_avx2(copy, count_[bin], {lo, lo + (1u << kShift)}, k - before, kSmallSelection);
    }
#endif
    std::nth_element(scratch_, scratch_ + (k - before), scratch_ + count_[bin]);
    return scratch_[k - before];
  }

 private:
  static constexpr int kShift = 21, kBins = 2048, kBlock = 64;
  static constexpr size_t kSmallSelection = 32;  // keys left to nth_element (16 to 64 timed alike)
  const uint32_t* keys_;
  int64_t n_;
  int bins_;
  uint32_t* scratch_;  // room for 2n + 16 keys: a bucket, and a copy to select in
  int gathered_ = -1;
  uint32_t count_[kBins];  // small groups: fewer than 2^32 keys
  uint32_t block_[kBins / kBlock];
};

inline uint32_t signed_key(float v) {
  const uint32_t r = bits_of(v);
  return r ^ (static_cast<uint32_t>(static_cast<int32_t>(r) >> 31) | 0x80000000u);
}
inline float from_signed_key(uint32_t k) { return float_of(k ^ ((k & 0x80000000u) ? 0x80000000u : 0xffffffffu)); }

// Elements of keys[0, n) below key, one at a time: the portable path and the vector tail.
inline int64_t count_below_scalar(const uint32_t* keys, int64_t n, uint32_t key) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += keys[i] < key;
  return count;
}

#if defined(__x86_64__) || defined(__i386__)
// The sum of eight 32-bit lane counters.
__attribute__((target("avx2"))) inline int64_t lane_sum(__m256i v) {
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t sum = 0;
  for (uint32_t l : lanes) sum += l;
  return sum;
}

// Eight keys a compare (unsigned, as signed with the sign bits flipped), counted per lane in
// stretches short enough for 32-bit counters.
__attribute__((target("avx2"))) int64_t count_below_avx2(const uint32_t* keys, int64_t n, uint32_t key) {
  const __m256i flip = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
  const __m256i bound = _mm256_set1_epi32(static_cast<int>(key ^ 0x80000000u));
  int64_t count = 0, j = 0;
  while (j + 8 <= n) {
    __m256i lanes = _mm256_setzero_si256();
    for (const int64_t stop = j + std::min<int64_t>(n - j, int64_t{1} << 30) / 8 * 8; j < stop; j += 8) {
      const __m256i k = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)), flip);
      lanes = _mm256_sub_epi32(lanes, _mm256_cmpgt_epi32(bound, k));
    }
    count += lane_sum(lanes);
  }
  return count + count_below_scalar(keys + j, n - j, key);
}
#endif

// Elements of keys[0, n) below key.
inline int64_t count_below(const uint32_t* keys, int64_t n, uint32_t key) {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx2()) return count_below_avx2(keys, n, key);
#endif
  return count_below_scalar(keys, n, key);
}

// small_group's values: the finite ones among x[0, n), as floats, appended to out in order
// (room for n); lowers *x_min to the smallest of them. Returns how many.
template <class D>
int64_t collect_finite_scalar(const typename D::Raw* x, int64_t n, float* out, float* x_min) {
  int64_t kept = 0;
  float low = *x_min;
  for (int64_t j = 0; j < n; ++j) {
    // Every value is written and only finite ones are kept: no branch per element.
    const bool finite = D::finite(x[j]);
    const float v = D::value(x[j]);
    out[kept] = v;
    kept += finite;
    low = std::min(low, finite ? v : INFINITY);
  }
  *x_min = low;
  return kept;
}

#if defined(__x86_64__) || defined(__i386__)
// Eight values of x as their float32 bits: exact, as every float16 and bfloat16 value is a float32.
template <class D>
__attribute__((target("avx2,f16c"))) inline __m256i float32_bits8(const typename D::Raw* x) {
  if constexpr (std::is_same<D, Float32>::value)
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  else if constexpr (std::is_same<D, Float16>::value)
    return _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
  else
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16);
}

// collect_finite_scalar eight values at a time (as float32 bits), the finite lanes compacted
// by a permute.
template <class D>
__attribute__((target("avx2,f16c,popcnt"))) int64_t collect_finite_avx2(const typename D::Raw* x, int64_t n, float* out,
                                                                       float* x_min) {
  const CompressTable& table = compress_table();
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  const __m256 infinity = _mm256_set1_ps(INFINITY);
  __m256 low = infinity;
  int64_t kept = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i bits = float32_bits8<D>(x + j);
    const __m256i non_finite = _mm256_cmpeq_epi32(_mm256_and_si256(bits, exponent), exponent);
    const unsigned finite = ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(non_finite))) & 0xffu;
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[finite]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kept), _mm256_permutevar8x32_epi32(bits, perm));
    kept += __builtin_popcount(finite);
    low = _mm256_min_ps(low, _mm256_blendv_ps(_mm256_castsi256_ps(bits), infinity, _mm256_castsi256_ps(non_finite)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, low);
  for (float v : lanes) *x_min = std::min(*x_min, v);
  return kept + collect_finite_scalar<D>(x + j, n - j, out + kept, x_min);
}

#pragma GCC diagnostic push  // GCC bug 105593, as at philox_w0_avx512
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// collect_finite_avx2 sixteen values at a time, compacted by vpcompressd.
template <class D>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt,avx2,f16c"))) int64_t collect_finite_avx512(
    const typename D::Raw* x, int64_t n, float* out, float* x_min) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  __m512 low = _mm512_set1_ps(INFINITY);
  int64_t kept = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512i bits;
    if constexpr (std::is_same<D, Float32>::value)
      bits = _mm512_loadu_si512(x + j);
    else if constexpr (std::is_same<D, Float16>::value)
      bits = _mm512_castps_si512(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j))));
    else
      bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j))), 16);
    const __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
    _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(finite, bits));
    kept += __builtin_popcount(finite);
    low = _mm512_mask_min_ps(low, finite, low, _mm512_castsi512_ps(bits));
  }
  *x_min = std::min(*x_min, _mm512_reduce_min_ps(low));
  return kept + collect_finite_scalar<D>(x + j, n - j, out + kept, x_min);
}
#pragma GCC diagnostic pop
#endif

template <class D>
int64_t collect_finite(const typename D::Raw* x, int64_t n, float* out, float* x_min) {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx512()) return collect_finite_avx512<D>(x, n, out, x_min);
  if (use_avx2()) return collect_finite_avx2<D>(x, n, out, x_min);
#endif
  return collect_finite_scalar<D>(x, n, out, x_min);
}

template <class D>
void small_group(const Problem& p, int64_t begin, int64_t end, Scratch& s) {
  using Raw = typename D::Raw;
  const Raw* x = static_cast<const Raw*>(p.x);
  s.vals.resize(static_cast<size_t>(end - begin));
  float x_min = INFINITY;
  int64_t N = 0;
  for (int64_t token = begin / p.I; token * p.I < end; ++token) {
    if (!token_valid(p, token)) continue;
    const int64_t first = token * p.I;
    N += collect_finite<D>(x + first, std::min(end, first + p.I) - first, s.vals.data() + N, &x_min);
  }
  s.vals.resize(N);
  if (N == 0) return select_and_move<D>(p, begin, end, Stats{}, TieShare{});
  const int64_t rank = (N - 1) / 2;
  s.akeys.resize(N);
  s.keys.resize(N);
  s.abs_buckets.resize(2 * N + 16);  // KeyRanks' scratch
  s.buckets.resize(2 * N + 16);
  // Bits of non-negative floats order like the values.
  for (int64_t j = 0; j < N; ++j) s.akeys[j] = bits_of(std::fabs(s.vals[j]));
  KeyRanks abs_ranks(s.akeys.data(), N, true, s.abs_buckets.data());
  const float m = float_of(abs_ranks.at(rank));

  for (int64_t j = 0; j < N; ++j) s.keys[j] = bits_of(std::fabs(float_of(s.akeys[j]) - m));
  const float mad = float_of(KeyRanks(s.keys.data(), N, true, s.buckets.data()).at(rank));
  // eps >= 0 (kappa, c >= 0): its bits compare like the value.
  const int64_t n = moved_count(p.attrs, N, count_below(s.akeys.data(), N, bits_of(epsilon(p.attrs, mad))));

  Stats st;
  st.n_valid = N;
  st.m_neg = std::fabs(x_min);
  st.threshold = float_of(abs_ranks.at(n - 1));
  st.tie_quota = n - count_below(s.akeys.data(), N, bits_of(st.threshold));
  const PercentileRanks pr = percentile_ranks(p.attrs, N);
  float v_lo, v_hi;
  if (p.attrs.percentile_abs) {
    v_lo = float_of(abs_ranks.at(pr.lo_index));
    v_hi = float_of(abs_ranks.at(pr.hi_index));
  } else {
    for (int64_t j = 0; j < N; ++j) s.keys[j] = signed_key(s.vals[j]);
    KeyRanks signed_ranks(s.keys.data(), N, false, s.buckets.data());
    v_lo = from_signed_key(signed_ranks.at(pr.lo_index));
    v_hi = from_signed_key(signed_ranks.at(pr.hi_index));
  }
  st.q_p = interpolate(pr, v_lo, v_hi);
  select_and_move<D>(p, begin, end, st, TieShare{st.tie_quota});
}

constexpr int kMaxRanges = 8;  // of the vector range test below

#if defined(__x86_64__) || defined(__i386__)
// Copies to out, in order, the x[j] (j < n) whose |x| key (float32 bits without the sign)
// lies in one of the ranges [lo[i], hi[i]), i < ranges <= kMaxRanges; returns how many.
// out needs room for n + 8 values.
size_t keep_in_ranges_scalar(const uint32_t* x, int64_t n, const uint32_t* lo, const uint32_t* hi, int ranges,
                             uint32_t* out) {
  size_t kept = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t a = x[j] & 0x7fffffffu;
    bool in = false;
    for (int i = 0; i < ranges; ++i) in |= a >= lo[i] && a < hi[i];
    out[kept] = x[j];
    kept += in;
  }
  return kept;
}

__attribute__((target("avx2,popcnt"))) size_t keep_in_ranges_avx2(const uint32_t* x, int64_t n, const uint32_t* lo,
                                                                   const uint32_t* hi, int ranges, uint32_t* out) {
  // Keys below 2^31 compare correctly as signed integers.
  __m256i above[kMaxRanges], below[kMaxRanges];
  for (int i = 0; i < ranges; ++i) {
    above[i] = _mm256_set1_epi32(static_cast<int>(lo[i]) - 1);
    below[i] = _mm256_set1_epi32(static_cast<int>(hi[i]));
  }
  const CompressTable& table = compress_table();
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  size_t kept = 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), a = _mm256_and_si256(v, abs_mask);
    __m256i in = _mm256_setzero_si256();
    for (int i = 0; i < ranges; ++i)
      in = _mm256_or_si256(in, _mm256_and_si256(_mm256_cmpgt_epi32(a, above[i]), _mm256_cmpgt_epi32(below[i], a)));
    const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(in)));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kept), _mm256_permutevar8x32_epi32(v, perm));
    kept += static_cast<size_t>(__builtin_popcount(mask));
  }
  return kept + keep_in_ranges_scalar(x + j, n - j, lo, hi, ranges, out + kept);
}
#endif

// Sorts keys that share their high 16 bits, with scratch of the same size: two byte-wide
// counting passes, which leave the result back in keys.
void sort_low_halves(uint32_t* keys, size_t n, uint32_t* scratch) {
  if (n < 256) return std::sort(keys, keys + n);
  uint32_t *from = keys, *to = scratch;
  for (int shift = 0; shift < 16; shift += 8) {
    size_t start[257] = {0};
    for (size_t i = 0; i < n; ++i) ++start[((from[i] >> shift) & 0xffu) + 1];
    for (int b = 0; b < 256; ++b) start[b + 1] += start[b];
    for (size_t i = 0; i < n; ++i) to[start[(from[i] >> shift) & 0xffu]++] = from[i];
    std::swap(from, to);
  }
}

// A sorted run of keys inside a pool: a bin's |x| keys, ascending.
struct Keys {
  const uint32_t* data = nullptr;
  size_t count = 0;
  const uint32_t* begin() const { return data; }
  const uint32_t* end() const { return data + count; }
  size_t size() const { return count; }
  bool empty() const { return count == 0; }
  uint32_t front() const { return data[0]; }
  uint32_t back() const { return data[count - 1]; }
  uint32_t operator[](size_t i) const { return data[i]; }
};

// Thread t's contiguous share of [begin, end). Every pass over a large group splits it the
// same way, so that per-thread counts line up across passes.
inline void thread_chunk(int64_t begin, int64_t end, int threads, int t, int64_t* b, int64_t* e) {
  const int64_t L = end - begin;
  *b = begin + L * t / threads;
  *e = begin + L * (t + 1) / threads;
}

// f(lo, hi) for the stretches of [b, e) that belong to valid tokens: all of [b, e) at once
// without a mask (each call of a vector loop has its set-up and its tail), else one token at
// a time.
template <class F>
void for_valid_ranges(const Problem& p, int64_t b, int64_t e, F&& f) {
  if (p.mask_type == ARMQ_MASK_NONE) {
    if (b < e) f(b, e);
    return;
  }
  while (b < e) {
    const int64_t token = b / p.I;
    const int64_t token_end = std::min(e, (token + 1) * p.I);
    if (token_valid(p, token)) f(b, token_end);
    b = token_end;
  }
}

// ---- large float32 and float16 groups: brackets from a sample, then one counting pass -----
//
// The histogram pass below costs about two cycles per element (a scattered increment each);
// a vector test of |x| against a few key intervals costs about half that, and it can keep
// the values inside the intervals as it goes. So a float32 group (or a float16 one, widened
// block by block to float32 bits, whose 65536-bin histogram misses L1) first draws a sample (runs
// of contiguous elements spread over the group) and brackets every statistic by the sample's
// quantiles, with a margin of about four standard errors. One pass over x then counts, per
// interval, the valid elements below it, and keeps the values inside (about 10% of Gaussian
// values). A statistic is exact when its rank falls inside its interval, which those counts
// tell. When one does not (a sample unlike the rest of the group), the histogram path runs
// instead: the sample decides speed, never the result.

constexpr int kMaxIntervals = 6;  // |x| intervals of the counting pass: m, MAD (2), eps, t, Qp
constexpr int64_t kSampleRuns = 2048, kSampleRun = 64;
constexpr int64_t kSampleAhead = 16;  // runs between a prefetch and the read
constexpr int64_t kMinSampledGroup = int64_t{1} << 20;  // below this the sample costs too much
// float16 groups above this take the histogram path: 0.83-0.87x the time with the sample at
// 3.1M elements, 0.97x at 6.3M, 1.04-1.06x from 12.6M to 29M (Zen 5, 32 MB of L3), where the
// kept values no longer stay in cache.
constexpr int64_t kMaxSampledHalfGroup = int64_t{1} << 22;
constexpr size_t kParallelSelection = 8192;  // kept keys from which a selection splits its first round
constexpr size_t kDirectSelection = 512;     // kept keys a selection leaves to nth_element
constexpr uint32_t kFiniteKeys = 0x7f800000u;            // |x| keys of the finite values

// Signed keys as int32 that order like x (-0 just below +0), for the vector compares.
inline int32_t signed_order(uint32_t key) { return static_cast<int32_t>(key ^ 0x80000000u); }

// Counts of one thread's share of the counting pass.
struct IntervalCounts {
  int64_t below[kMaxIntervals] = {};  // valid elements with |x| key below interval i
  int64_t below_signed = 0;           // valid elements with signed key below the signed interval
  int64_t valid = 0;
  uint32_t largest_raw = 0;  // the largest raw bits: see count_and_keep_avx2
  bool non_finite = false;   // a NaN or Inf was seen: the counts do not hold (see count_and_keep_avx2)
  size_t kept = 0;  // of the block at hand
  int64_t inside[kMaxIntervals + 1] = {};  // kept keys in each interval, the signed one last (split_by_interval)
};

// The counting pass compares one byte per element for the |x| intervals: the high half h of
// the |x| key as (h - byte_base) >> byte_shift, saturated to [0, 255]. fit_to_byte_keys
// widens the intervals to whole steps of that grid (a few more values kept), so that the
// bytes tell exactly which interval a value lies in.
struct IntervalSet {
  KeyInterval abs[kMaxIntervals];
  int n_abs = 0;
  bool has_signed = false;
  KeyInterval signed_keys{0, 0};
  int byte_base = 0, byte_shift = 0;
  uint8_t byte_lo[kMaxIntervals] = {}, byte_hi[kMaxIntervals] = {};  // abs[i] is bytes [lo, hi)
};

#if defined(__x86_64__) || defined(__i386__)
// The |x| intervals (ascending, disjoint, whole bins) on the finest byte grid that spans
// them all: byte 0 lies below the first, byte 255 above the last (NaN and Inf saturate there).
void fit_to_byte_keys(IntervalSet& set) {
  const int lo = static_cast<int>(set.abs[0].lo >> 16), hi = static_cast<int>(set.abs[set.n_abs - 1].hi >> 16);
  int shift = 0;
  while ((((hi - lo) + (1 << shift) - 1) >> shift) + 1 > 254) ++shift;
  const int base = lo - (1 << shift);
  IntervalSet fitted = set;
  fitted.n_abs = 0;
  for (int i = 0; i < set.n_abs; ++i) {
    const int b_lo = (static_cast<int>(set.abs[i].lo >> 16) - base) >> shift;
    const int b_hi = ((static_cast<int>(set.abs[i].hi >> 16) - base) + (1 << shift) - 1) >> shift;
    const uint32_t key_hi = std::min(static_cast<uint32_t>(base + (b_hi << shift)) << 16, kFiniteKeys);
    if (fitted.n_abs > 0 && fitted.byte_hi[fitted.n_abs - 1] >= b_lo) {  // widened into the one before
      fitted.abs[fitted.n_abs - 1].hi = key_hi;
      fitted.byte_hi[fitted.n_abs - 1] = static_cast<uint8_t>(b_hi);
      continue;
    }
    fitted.abs[fitted.n_abs] = {static_cast<uint32_t>(base + (b_lo << shift)) << 16, key_hi};
    fitted.byte_lo[fitted.n_abs] = static_cast<uint8_t>(b_lo);
    fitted.byte_hi[fitted.n_abs] = static_cast<uint8_t>(b_hi);
    ++fitted.n_abs;
  }
  fitted.byte_base = base;
  fitted.byte_shift = shift;
  set = fitted;
}

// How the counting pass compares the signed interval: not at all, on the raw high halves (when
// it lies at or above +0: every negative value is then below it), or on signed keys.
enum class SignedCompare { kNone, kRaw, kKey };

// The counting pass one element at a time, for the few past the vector loop: adds to c and
// appends the kept values at out, which is c->kept values into the block's buffer.
template <int kAbs, bool kHasSigned>
inline void count_and_keep_tail(const uint32_t* x, int64_t n, const IntervalSet& set, IntervalCounts* c,
                                uint32_t* out) {
  size_t kept = 0;
  for (int64_t j = 0; j < n; ++j) {
    c->largest_raw = std::max(c->largest_raw, x[j]);
    const uint32_t a = x[j] & 0x7fffffffu;
    if (a >= kFiniteKeys) {
      c->non_finite = true;
      continue;
    }
    ++c->valid;
    bool in = false;
    for (int i = 0; i < kAbs; ++i) {
      c->below[i] += a < set.abs[i].lo;
      in |= set.abs[i].contains(a);
    }
    if (kHasSigned) {
      const uint32_t skey = signed_key(float_of(x[j]));
      c->below_signed += skey < set.signed_keys.lo;
      in |= set.signed_keys.contains(skey);
    }
    out[kept] = x[j];
    kept += in;
  }
  c->kept += kept;
}

// The counting pass over x[0, n), n <= kPieceMax: adds to c, and appends to out (room for
// n + 32 values) the raw values inside any interval, in order. It counts as if every value
// were finite and only notes (c->non_finite) when one is not: then the caller falls back.
// Thirty-two elements at a time: the |x| intervals are compared on byte keys (see
// IntervalSet), the signed one on 16-bit high halves; each interval's count of elements at or
// above it sits in a register of byte counters, emptied every 255 rounds. Every lane is
// stored and only kept lanes advance the end: whether a lane is kept is a coin toss, and a
// branch on it would cost more.
constexpr int64_t kPieceMax = 1 << 16;  // elements per block of the pass, each kept in a buffer of its own size
template <int kAbs, SignedCompare kSigned>
__attribute__((target("avx2,popcnt"))) void count_and_keep_avx2(const uint32_t* x, int64_t n, const IntervalSet& set,
                                                                 IntervalCounts* c, uint32_t* out) {
  constexpr bool kHasSigned = kSigned != SignedCompare::kNone;
  constexpr int kSegments = kAbs + (kHasSigned ? 1 : 0);
  const CompressTable& table = compress_table();
  const __m256i abs_high = _mm256_set1_epi16(0x7fff), zero = _mm256_setzero_si256();
  const __m256i flip_bytes = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i byte_base = _mm256_set1_epi16(static_cast<int16_t>(set.byte_base));
  const __m128i byte_shift = _mm_cvtsi32_si128(set.byte_shift);
  const __m256i element_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // A key k lies at or above a bound b when k > b - 1: bytes compared as int8 with their top
  // bits flipped, high halves as int16. The bounds stay in memory, as operands of the
  // compares: registers are for the counters.
  __m256i lo_m1[kSegments], hi_m1[kSegments];
  for (int i = 0; i < kAbs; ++i) {
    lo_m1[i] = _mm256_set1_epi8(static_cast<char>((set.byte_lo[i] - 1) ^ 0x80));
    hi_m1[i] = _mm256_set1_epi8(static_cast<char>((set.byte_hi[i] - 1) ^ 0x80));
  }
  if (kHasSigned) {  // signed_order(key) >> 16 fits int16
    lo_m1[kAbs] = _mm256_set1_epi16(static_cast<int16_t>((signed_order(set.signed_keys.lo) >> 16) - 1));
    hi_m1[kAbs] = _mm256_set1_epi16(static_cast<int16_t>((signed_order(set.signed_keys.hi) >> 16) - 1));
  }
  int64_t ge_total[kSegments] = {};
  __m256i largest_high = zero, largest_raw = zero;
  size_t kept = c->kept;
  int64_t j = 0;
  while (j + 32 <= n) {
    __m256i counts[kSegments];  // byte counters of elements at or above each interval
    for (auto& v : counts) v = zero;
    for (const int64_t stop = j + std::min<int64_t>(255 * 32, (n - j) & ~int64_t{31}); j < stop; j += 32) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 8));
      const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 16));
      const __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 24));
      // Raw high halves, 16 lanes each: v0[0..3], v1[0..3], v0[4..7], v1[4..7] (and v2, v3).
      const __m256i raw01 = _mm256_packs_epi32(_mm256_srai_epi32(v0, 16), _mm256_srai_epi32(v1, 16));
      const __m256i raw23 = _mm256_packs_epi32(_mm256_srai_epi32(v2, 16), _mm256_srai_epi32(v3, 16));
      const __m256i h01 = _mm256_and_si256(raw01, abs_high), h23 = _mm256_and_si256(raw23, abs_high);
      // NaN and Inf lie above every finite |x|.
      largest_high = _mm256_max_epu16(largest_high, _mm256_max_epu16(h01, h23));
      // As unsigned integers negative values lie above positive ones, ordered by |x|: the
      // largest raw bits are those of the negative value of largest |x|, if there is one
      // (the spec's Mneg, used only then).
      largest_raw = _mm256_max_epu32(largest_raw, _mm256_max_epu32(_mm256_max_epu32(v0, v1), _mm256_max_epu32(v2, v3)));
      // Byte keys: per 128-bit half, four lanes of each of v0, v1 (from h01), v2, v3 (from h23).
      const __m256i bytes = _mm256_xor_si256(
          _mm256_packus_epi16(_mm256_sra_epi16(_mm256_subs_epi16(h01, byte_base), byte_shift),
                              _mm256_sra_epi16(_mm256_subs_epi16(h23, byte_base), byte_shift)),
          flip_bytes);
      __m256i in = zero;
      for (int i = 0; i < kAbs; ++i) {  // non-finite keys lie above every interval
        const __m256i ge = _mm256_cmpgt_epi8(bytes, lo_m1[i]);
        in = _mm256_or_si256(in, _mm256_andnot_si256(_mm256_cmpgt_epi8(bytes, hi_m1[i]), ge));
        counts[i] = _mm256_sub_epi8(counts[i], ge);
      }
      if (kHasSigned) {
        __m256i s01 = raw01, s23 = raw23;
        if (kSigned == SignedCompare::kKey) {  // signed_order >> 16: h for positive values, -1 - h for negative ones
          s01 = _mm256_xor_si256(raw01, _mm256_srli_epi16(_mm256_srai_epi16(raw01, 15), 1));
          s23 = _mm256_xor_si256(raw23, _mm256_srli_epi16(_mm256_srai_epi16(raw23, 15), 1));
        }
        const __m256i ge01 = _mm256_cmpgt_epi16(s01, lo_m1[kAbs]), ge23 = _mm256_cmpgt_epi16(s23, lo_m1[kAbs]);
        const __m256i in01 = _mm256_andnot_si256(_mm256_cmpgt_epi16(s01, hi_m1[kAbs]), ge01);
        const __m256i in23 = _mm256_andnot_si256(_mm256_cmpgt_epi16(s23, hi_m1[kAbs]), ge23);
        counts[kAbs] = _mm256_sub_epi8(counts[kAbs], _mm256_packs_epi16(ge01, ge23));
        in = _mm256_or_si256(in, _mm256_packs_epi16(in01, in23));
      }
      // Bytes back in element order (each 32-bit group of `in` is four lanes of one vector),
      // so that mask byte q holds v[q]'s lanes.
      const unsigned mask = static_cast<unsigned>(_mm256_movemask_epi8(_mm256_permutevar8x32_epi32(in, element_order)));
      const __m256i v[4] = {v0, v1, v2, v3};
      for (int q = 0; q < 4; ++q) {
        const unsigned lanes = (mask >> (8 * q)) & 0xffu;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kept),
                            _mm256_permutevar8x32_epi32(
                                v[q], _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[lanes]))));
        kept += static_cast<size_t>(__builtin_popcount(lanes));
      }
    }
    alignas(32) uint64_t sums[4];
    for (int i = 0; i < kSegments; ++i) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), _mm256_sad_epu8(counts[i], zero));
      ge_total[i] += static_cast<int64_t>(sums[0] + sums[1] + sums[2] + sums[3]);
    }
  }
  c->valid += j;
  for (int i = 0; i < kAbs; ++i) c->below[i] += j - ge_total[i];
  if (kHasSigned) c->below_signed += j - ge_total[kAbs];
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), largest_raw);
  for (uint32_t l : lanes) c->largest_raw = std::max(c->largest_raw, l);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), largest_high);
  for (uint32_t l : lanes) c->non_finite |= (l & 0xffffu) >= (kFiniteKeys >> 16) || (l >> 16) >= (kFiniteKeys >> 16);
  c->kept = kept;
  count_and_keep_tail<kAbs, kHasSigned>(x + j, n - j, set, c, out + kept);
}

#pragma GCC diagnostic push  // GCC bug 105593, as at philox_w0_avx512
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// count_and_keep_avx2 with AVX-512, sixteen elements at a time: the same byte keys, 64 a
// register and put in element order by one permute; each interval is two compares into a
// 64-bit lane mask and a popcount, and one compress per sixteen values keeps the lanes inside.
template <int kAbs, SignedCompare kSigned>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) void count_and_keep_avx512(const uint32_t* x, int64_t n,
                                                                                     const IntervalSet& set,
                                                                                     IntervalCounts* c, uint32_t* out) {
  constexpr bool kHasSigned = kSigned != SignedCompare::kNone;
  const __m512i abs_high = _mm512_set1_epi16(0x7fff), zero = _mm512_setzero_si512();
  const __m512i byte_base = _mm512_set1_epi16(static_cast<int16_t>(set.byte_base));
  const __m128i byte_shift = _mm_cvtsi32_si128(set.byte_shift);
  // After the two packs, dword 4k + q of the bytes holds elements 4k .. 4k + 3 of v_q.
  const __m512i element_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i lo[kAbs], hi[kAbs];
  for (int i = 0; i < kAbs; ++i) {
    lo[i] = _mm512_set1_epi8(static_cast<char>(set.byte_lo[i]));
    hi[i] = _mm512_set1_epi8(static_cast<char>(set.byte_hi[i]));
  }
  __m512i signed_lo_m1 = zero, signed_hi_m1 = zero;  // as in count_and_keep_avx2
  if (kHasSigned) {
    signed_lo_m1 = _mm512_set1_epi16(static_cast<int16_t>((signed_order(set.signed_keys.lo) >> 16) - 1));
    signed_hi_m1 = _mm512_set1_epi16(static_cast<int16_t>((signed_order(set.signed_keys.hi) >> 16) - 1));
  }
  int64_t ge_total[kAbs + 1] = {};
  __m512i largest_high = zero, largest_raw = zero;
  size_t kept = c->kept;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    const __m512i v[4] = {_mm512_loadu_si512(x + j), _mm512_loadu_si512(x + j + 16), _mm512_loadu_si512(x + j + 32),
                          _mm512_loadu_si512(x + j + 48)};
    // Raw high halves, per 128-bit lane k: elements 4k .. 4k + 3 of v0 then of v1 (and v2, v3).
    const __m512i raw01 = _mm512_packus_epi32(_mm512_srli_epi32(v[0], 16), _mm512_srli_epi32(v[1], 16));
    const __m512i raw23 = _mm512_packus_epi32(_mm512_srli_epi32(v[2], 16), _mm512_srli_epi32(v[3], 16));
    const __m512i h01 = _mm512_and_si512(raw01, abs_high), h23 = _mm512_and_si512(raw23, abs_high);
    largest_high = _mm512_max_epu16(largest_high, _mm512_max_epu16(h01, h23));
    largest_raw = _mm512_max_epu32(largest_raw, _mm512_max_epu32(_mm512_max_epu32(v[0], v[1]), _mm512_max_epu32(v[2], v[3])));
    const __m512i bytes = _mm512_permutexvar_epi32(
        element_order, _mm512_packus_epi16(_mm512_sra_epi16(_mm512_subs_epi16(h01, byte_base), byte_shift),
                                           _mm512_sra_epi16(_mm512_subs_epi16(h23, byte_base), byte_shift)));
    uint64_t in = 0;
    for (int i = 0; i < kAbs; ++i) {
      const __mmask64 ge = _mm512_cmpge_epu8_mask(bytes, lo[i]);
      in |= _mm512_mask_cmplt_epu8_mask(ge, bytes, hi[i]);
      ge_total[i] += __builtin_popcountll(ge);
    }
    if (kHasSigned) {
      __m512i s01 = raw01, s23 = raw23;
      if (kSigned == SignedCompare::kKey) {
        s01 = _mm512_xor_si512(raw01, _mm512_srli_epi16(_mm512_srai_epi16(raw01, 15), 1));
        s23 = _mm512_xor_si512(raw23, _mm512_srli_epi16(_mm512_srai_epi16(raw23, 15), 1));
      }
      const __mmask32 ge01 = _mm512_cmpgt_epi16_mask(s01, signed_lo_m1), ge23 = _mm512_cmpgt_epi16_mask(s23, signed_lo_m1);
      ge_total[kAbs] += __builtin_popcount(ge01) + __builtin_popcount(ge23);
      // The word masks in the bytes' order: as words, packed to bytes, put in element order.
      const __m512i in_words = _mm512_packs_epi16(_mm512_movm_epi16(_mm512_mask_cmple_epi16_mask(ge01, s01, signed_hi_m1)),
                                                  _mm512_movm_epi16(_mm512_mask_cmple_epi16_mask(ge23, s23, signed_hi_m1)));
      in |= _mm512_movepi8_mask(_mm512_permutexvar_epi32(element_order, in_words));
    }
    for (int q = 0; q < 4; ++q, in >>= 16) {
      const __mmask16 lanes = static_cast<__mmask16>(in);
      _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(lanes, v[q]));
      kept += static_cast<size_t>(__builtin_popcount(lanes));
    }
  }
  c->valid += j;
  for (int i = 0; i < kAbs; ++i) c->below[i] += j - ge_total[i];
  if (kHasSigned) c->below_signed += j - ge_total[kAbs];
  c->largest_raw = std::max(c->largest_raw, static_cast<uint32_t>(_mm512_reduce_max_epu32(largest_raw)));
  const __m512i high = _mm512_max_epu16(largest_high, _mm512_srli_epi32(largest_high, 16));  // both halves, in the low one
  c->non_finite |= static_cast<uint32_t>(_mm512_reduce_max_epu32(_mm512_and_si512(high, _mm512_set1_epi32(0xffff)))) >=
                   (kFiniteKeys >> 16);
  c->kept = kept;
  count_and_keep_tail<kAbs, kHasSigned>(x + j, n - j, set, c, out + kept);
}
#pragma GCC diagnostic pop

using CountAndKeep = void (*)(const uint32_t*, int64_t, const IntervalSet&, IntervalCounts*, uint32_t*);
CountAndKeep count_and_keep_for(const IntervalSet& set) {
  using S = SignedCompare;
  static const CountAndKeep table[3][kMaxIntervals] = {
      {count_and_keep_avx2<1, S::kNone>, count_and_keep_avx2<2, S::kNone>, count_and_keep_avx2<3, S::kNone>,
       count_and_keep_avx2<4, S::kNone>, count_and_keep_avx2<5, S::kNone>, count_and_keep_avx2<6, S::kNone>},
      {count_and_keep_avx2<1, S::kRaw>, count_and_keep_avx2<2, S::kRaw>, count_and_keep_avx2<3, S::kRaw>,
       count_and_keep_avx2<4, S::kRaw>, count_and_keep_avx2<5, S::kRaw>, count_and_keep_avx2<6, S::kRaw>},
      {count_and_keep_avx2<1, S::kKey>, count_and_keep_avx2<2, S::kKey>, count_and_keep_avx2<3, S::kKey>,
       count_and_keep_avx2<4, S::kKey>, count_and_keep_avx2<5, S::kKey>, count_and_keep_avx2<6, S::kKey>}};
  static const CountAndKeep table512[3][kMaxIntervals] = {
      {count_and_keep_avx512<1, S::kNone>, count_and_keep_avx512<2, S::kNone>, count_and_keep_avx512<3, S::kNone>,
       count_and_keep_avx512<4, S::kNone>, count_and_keep_avx512<5, S::kNone>, count_and_keep_avx512<6, S::kNone>},
      {count_and_keep_avx512<1, S::kRaw>, count_and_keep_avx512<2, S::kRaw>, count_and_keep_avx512<3, S::kRaw>,
       count_and_keep_avx512<4, S::kRaw>, count_and_keep_avx512<5, S::kRaw>, count_and_keep_avx512<6, S::kRaw>},
      {count_and_keep_avx512<1, S::kKey>, count_and_keep_avx512<2, S::kKey>, count_and_keep_avx512<3, S::kKey>,
       count_and_keep_avx512<4, S::kKey>, count_and_keep_avx512<5, S::kKey>, count_and_keep_avx512<6, S::kKey>}};
  const int compare = !set.has_signed ? 0 : signed_order(set.signed_keys.lo) >= 0 ? 1 : 2;
  return (use_avx512() ? table512 : table)[compare][set.n_abs - 1];
}


// Splits the kept raw values v[0, n) by interval, as keys: segment i < set.n_abs holds the
// |x| keys in set.abs[i], the last (with set.has_signed) the signed keys in set.signed_keys.
// Segment i's keys are appended to out[i][0, count[i]), and count[i] grows. The split counts
// as it goes: before each stretch of kSplitStretch values every buffer gets room for all of
// them (buffers are workspace, kept from call to call), so the loop itself checks nothing.
constexpr size_t kSplitStretch = 4096;

// The split one value at a time, for v[from, to) past the vector loop: segment i's next key at
// o[i][fill[i]].
inline void split_by_interval_tail(const uint32_t* v, size_t from, size_t to, const IntervalSet& set, uint32_t* const* o,
                                   size_t* fill) {
  const int segments = set.n_abs + (set.has_signed ? 1 : 0);
  for (size_t j = from; j < to; ++j)
    for (int i = 0; i < segments; ++i) {
      const uint32_t key = i < set.n_abs ? v[j] & 0x7fffffffu : signed_key(float_of(v[j]));
      o[i][fill[i]] = key;
      fill[i] += (i < set.n_abs ? set.abs[i] : set.signed_keys).contains(key);
    }
}

__attribute__((target("avx2,popcnt"))) void split_by_interval_avx2(const uint32_t* v, size_t n, const IntervalSet& set,
                                                                   std::vector<uint32_t>* out, int64_t* count) {
  const CompressTable& table = compress_table();
  const int segments = set.n_abs + (set.has_signed ? 1 : 0);
  const __m256i flip = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
  __m256i lo[kMaxIntervals + 1], span[kMaxIntervals + 1];
  for (int i = 0; i < segments; ++i) {
    const KeyInterval w = i < set.n_abs ? set.abs[i] : set.signed_keys;
    lo[i] = _mm256_set1_epi32(static_cast<int>(w.lo));
    span[i] = _mm256_set1_epi32(static_cast<int>((w.hi - w.lo) ^ 0x80000000u));
  }
  auto key_of = [&](__m256i raw, int i) __attribute__((target("avx2"))) {
    return i < set.n_abs ? _mm256_and_si256(raw, _mm256_set1_epi32(0x7fffffff))
                         : _mm256_xor_si256(raw, _mm256_or_si256(_mm256_srai_epi32(raw, 31), flip));
  };
  size_t fill[kMaxIntervals + 1];
  for (int i = 0; i < segments; ++i) fill[i] = static_cast<size_t>(count[i]);
  uint32_t* o[kMaxIntervals + 1];
  for (size_t from = 0; from < n; from += kSplitStretch) {
    const size_t to = std::min(n, from + kSplitStretch), body = from + ((to - from) & ~size_t{7});
    for (int i = 0; i < segments; ++i) {
      const size_t room = fill[i] + (to - from) + 8;
      if (out[i].size() < room) out[i].resize(std::max(room, 2 * out[i].size()));
      o[i] = out[i].data();
    }
    for (size_t j = from; j < body; j += 8) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j));
      for (int i = 0; i < segments; ++i) {
        const __m256i key = key_of(raw, i);
        const unsigned mask = lanes_in_interval(key, lo[i], span[i]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[i] + fill[i]),
                            _mm256_permutevar8x32_epi32(key, _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[mask]))));
        fill[i] += static_cast<size_t>(__builtin_popcount(mask));
      }
    }
    split_by_interval_tail(v, body, to, set, o, fill);
  }
  for (int i = 0; i < segments; ++i) count[i] = static_cast<int64_t>(fill[i]);
}

#pragma GCC diagnostic push  // GCC bug 105593, as at philox_w0_avx512
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// split_by_interval_avx2 with AVX-512: sixteen values a step, an unsigned compare into a lane
// mask and a compress per segment.
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) void split_by_interval_avx512(const uint32_t* v, size_t n,
                                                                                        const IntervalSet& set,
                                                                                        std::vector<uint32_t>* out,
                                                                                        int64_t* count) {
  const int segments = set.n_abs + (set.has_signed ? 1 : 0);
  __m512i lo[kMaxIntervals + 1], span[kMaxIntervals + 1];
  for (int i = 0; i < segments; ++i) {
    const KeyInterval w = i < set.n_abs ? set.abs[i] : set.signed_keys;
    lo[i] = _mm512_set1_epi32(static_cast<int>(w.lo));
    span[i] = _mm512_set1_epi32(static_cast<int>(w.hi - w.lo));
  }
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), sign = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  size_t fill[kMaxIntervals + 1];
  for (int i = 0; i < segments; ++i) fill[i] = static_cast<size_t>(count[i]);
  uint32_t* o[kMaxIntervals + 1];
  for (size_t from = 0; from < n; from += kSplitStretch) {
    const size_t to = std::min(n, from + kSplitStretch), body = from + ((to - from) & ~size_t{15});
    for (int i = 0; i < segments; ++i) {
      const size_t room = fill[i] + (to - from) + 16;
      if (out[i].size() < room) out[i].resize(std::max(room, 2 * out[i].size()));
      o[i] = out[i].data();
    }
    for (size_t j = from; j < body; j += 16) {
      const __m512i raw = _mm512_loadu_si512(v + j);
      const __m512i abs_key = _mm512_and_si512(raw, abs_mask);
      for (int i = 0; i < segments; ++i) {
        // signed_key: the bits with the sign flipped for x >= +0, all flipped below
        const __m512i key = i < set.n_abs ? abs_key : _mm512_xor_si512(raw, _mm512_or_si512(_mm512_srai_epi32(raw, 31), sign));
        const __mmask16 in = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(key, lo[i]), span[i]);
        _mm512_storeu_si512(o[i] + fill[i], _mm512_maskz_compress_epi32(in, key));
        fill[i] += static_cast<size_t>(__builtin_popcount(in));
      }
    }
    split_by_interval_tail(v, body, to, set, o, fill);
  }
  for (int i = 0; i < segments; ++i) count[i] = static_cast<int64_t>(fill[i]);
}
#pragma GCC diagnostic pop
#endif

#if defined(__x86_64__) || defined(__i386__)
// A round of kth_key_avx2 (below): w cut into sixteen equal ranges of keys.
struct Sixteenths {
  static constexpr int kParts = 16;
  uint32_t bound[kParts + 1];  // part i is keys [bound[i], bound[i + 1]), clamped to w
  explicit Sixteenths(KeyInterval w) {
    const uint32_t step = (w.hi - w.lo) / kParts + 1;
    for (int i = 0; i < kParts; ++i)
      bound[i] = static_cast<uint32_t>(std::min<uint64_t>(uint64_t{w.lo} + uint64_t{step} * i, w.hi));
    bound[kParts] = w.hi;
  }
  static bool worth_it(KeyInterval w) { return w.hi - w.lo > kParts; }
  KeyInterval part(int i) const { return {bound[i], bound[i + 1]}; }
};

// below[i] = the keys[0, n) under the end of part i, for every part but the last (n).
__attribute__((target("avx2"))) void count_by_sixteenths_avx2(const uint32_t* keys, size_t n, const Sixteenths& cut,
                                                                int64_t* below) {
  constexpr int kPivots = Sixteenths::kParts - 1;
  const __m256i flip = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
  __m256i pivot[kPivots], count[kPivots];
  for (int i = 0; i < kPivots; ++i) {  // unsigned compares: flip the sign bits
    pivot[i] = _mm256_set1_epi32(static_cast<int>(cut.bound[i + 1] ^ 0x80000000u));
    count[i] = _mm256_setzero_si256();
  }
  size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)), flip);
    for (int i = 0; i < kPivots; ++i) count[i] = _mm256_sub_epi32(count[i], _mm256_cmpgt_epi32(pivot[i], v));
  }
  for (int i = 0; i < kPivots; ++i) {
    below[i] = lane_sum(count[i]);
    for (size_t t = j; t < n; ++t) below[i] += keys[t] < cut.bound[i + 1];
  }
  below[kPivots] = static_cast<int64_t>(n);
}

#pragma GCC diagnostic push  // GCC bug 105593, as at philox_w0_avx512
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// count_by_sixteenths_avx2 with AVX-512: sixteen keys a step, unsigned compares into masks.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void count_by_sixteenths_avx512(const uint32_t* keys, size_t n,
                                                                                    const Sixteenths& cut,
                                                                                    int64_t* below) {
  constexpr int kPivots = Sixteenths::kParts - 1;
  const __m512i one = _mm512_set1_epi32(1);
  __m512i pivot[kPivots], count[kPivots];
  for (int i = 0; i < kPivots; ++i) {
    pivot[i] = _mm512_set1_epi32(static_cast<int>(cut.bound[i + 1]));
    count[i] = _mm512_setzero_si512();
  }
  size_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i v = _mm512_loadu_si512(keys + j);
    for (int i = 0; i < kPivots; ++i)
      count[i] = _mm512_mask_add_epi32(count[i], _mm512_cmplt_epu32_mask(v, pivot[i]), count[i], one);
  }
  for (int i = 0; i < kPivots; ++i) {
    alignas(64) uint32_t lanes[16];
    _mm512_store_si512(lanes, count[i]);
    below[i] = 0;
    for (uint32_t l : lanes) below[i] += l;
    for (size_t t = j; t < n; ++t) below[i] += keys[t] < cut.bound[i + 1];
  }
  below[kPivots] = static_cast<int64_t>(n);
}
#pragma GCC diagnostic pop

// below[] as count_by_sixteenths_avx2 gives it, by the widest vector paths here.
void count_by_sixteenths(const uint32_t* keys, size_t n, const Sixteenths& cut, int64_t* below) {
  if (use_avx512()) return count_by_sixteenths_avx512(keys, n, cut, below);
  count_by_sixteenths_avx2(keys, n, cut, below);
}

// The part that holds rank k, given below[] summed as by count_by_sixteenths_avx2; *before:
// the keys in the parts ahead of it.
inline int part_holding(const int64_t* below, int64_t k, int64_t* before) {
  int s = 0;
  while (below[s] <= k) ++s;
  *before = s > 0 ? below[s - 1] : 0;
  return s;
}

// Rank k (0-based, ascending) of keys[0, n), all in w; reorders keys (room for n + 8). Each
// round counts the keys below 15 evenly spaced pivots and keeps those of the sixteenth that
// holds rank k; the last `small` or fewer are selected directly.
__attribute__((target("avx2,popcnt"))) uint32_t kth_key_avx2(uint32_t* keys, size_t n, KeyInterval w, int64_t k,
                                                             size_t small) {
  while (n > small && Sixteenths::worth_it(w)) {
    const Sixteenths cut(w);
    int64_t below[Sixteenths::kParts], before;
    count_by_sixteenths(keys, n, cut, below);
    w = cut.part(part_holding(below, k, &before));  // holds rank k, so not empty
    n = keys_in(keys, n, w, keys);
    k -= before;
  }
  std::nth_element(keys, keys + k, keys + n);
  return keys[k];
}

// Appends to out (room for n + 8; out == keys is fine) d = |a - m| of the |x| keys keys[0, n)
// where d lies in (cut_lo, cut_hi]; returns how many, and adds to *low those at or below cut_lo.
__attribute__((target("avx2,popcnt"))) size_t distances_avx2(const uint32_t* keys, size_t n, float m, float cut_lo,
                                                             float cut_hi, int64_t* low, uint32_t* out) {
  const CompressTable& table = compress_table();
  const __m256 vm = _mm256_set1_ps(m), lo = _mm256_set1_ps(cut_lo), hi = _mm256_set1_ps(cut_hi);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256i low_count = _mm256_setzero_si256();
  size_t kept = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)));
    const __m256 d = _mm256_and_ps(_mm256_sub_ps(a, vm), abs_mask);
    const __m256 at_low = _mm256_cmp_ps(d, lo, _CMP_LE_OQ);
    low_count = _mm256_sub_epi32(low_count, _mm256_castps_si256(at_low));
    const __m256 in = _mm256_andnot_ps(at_low, _mm256_cmp_ps(d, hi, _CMP_LE_OQ));
    const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(in));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kept),
                        _mm256_permutevar8x32_epi32(_mm256_castps_si256(d), _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[mask]))));
    kept += static_cast<size_t>(__builtin_popcount(mask));
  }
  *low += lane_sum(low_count);
  for (; j < n; ++j) {
    const float d = std::fabs(float_of(keys[j]) - m);
    *low += d <= cut_lo;
    out[kept] = bits_of(d);
    kept += d > cut_lo && d <= cut_hi;
  }
  return kept;
}
#endif

// Kept by the calling thread from call to call, like LargeGroupWorkspace.
struct SampledWorkspace {
  std::vector<uint32_t> hist;  // per thread: sample counts per raw bin (raw bits >> 16); zero between calls
  bool hist_dirty = false;     // an exception left counts in hist
  // Sampled values in the |x| bins below first_bin + k, by sign: over the bins the sample
  // touched only, so that a call reads and clears a few thousand bins, not all 65536.
  std::vector<uint32_t> below_abs, below_pos, below_neg;
  std::vector<std::vector<uint32_t>> kept;    // per thread: the values inside the intervals, of one block
  std::vector<std::array<std::vector<uint32_t>, kMaxIntervals + 1>> parts;  // per thread: their keys, by interval
  std::vector<std::vector<uint32_t>> distances;  // per thread: d = |a - m| of its kept values near m -/+ MAD
  std::vector<uint32_t> keys;                 // selection scratch
  std::vector<std::vector<uint32_t>> widened;  // per thread: a 16-bit block as float32 bits
};

#if defined(__x86_64__) || defined(__i386__)
// One run of the sample: adds x[0, n) to hist (by raw bin) and widens [*lo, *hi] to their |x|
// bins. For AVX2, as the whole sampled path: in the file's baseline (SSE2, no unsigned min/max)
// the min/max loop took half the sample's time.
__attribute__((target("avx2"))) void sample_run(const uint32_t* x, int64_t n, uint32_t* hist, uint32_t* lo, uint32_t* hi) {
  uint32_t a_lo = 0xffffffffu, a_hi = 0;  // the run's extreme |x| keys, in a loop apart: it vectorizes
  for (int64_t i = 0; i < n; ++i) {
    a_lo = std::min(a_lo, x[i] & 0x7fffffffu);
    a_hi = std::max(a_hi, x[i] & 0x7fffffffu);
  }
  for (int64_t i = 0; i < n; ++i) ++hist[x[i] >> 16];
  if (n > 0) *lo = std::min(*lo, a_lo >> 16), *hi = std::max(*hi, a_hi >> 16);
}

// The float32 bits of x[0, n): x itself for float32, else written to out. Exact: every float16
// value is a float32, so the sampled path runs unchanged on float16 groups (the same keys order
// them, and the same values come out).
template <class D>
const uint32_t* float32_bits(const typename D::Raw* x, int64_t n, uint32_t* out);
template <>
const uint32_t* float32_bits<Float32>(const uint32_t* x, int64_t, uint32_t*) {
  return x;
}
template <>
__attribute__((target("avx2,f16c"))) const uint32_t* float32_bits<Float16>(const uint16_t* x, int64_t n, uint32_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), float32_bits8<Float16>(x + i));
  for (; i < n; ++i) out[i] = bits_of(Float16::value(x[i]));
  return out;
}

// $ARMQUANT_DISABLE_SAMPLING (any value) sends every group down the histogram path, so that
// tests and benchmarks can compare the two. Read on each call, as tests change it.
bool sampling_enabled() { return !std::getenv("ARMQUANT_DISABLE_SAMPLING"); }

// Margins on the sample's quantiles: 4.8 standard errors. On the activations of SmolLM2 and
// Gemma-3 (4 layers each, 3 presets) no bracket missed down to 2.4 of them; a miss only costs
// time. $ARMQUANT_SAMPLE_MARGIN scales them (0 makes tests hit the fallback often).
double sample_margin_scale() {
  const char* v = std::getenv("ARMQUANT_SAMPLE_MARGIN");
  return v ? std::atof(v) : 1.0;
}

// Statistics of one large group from a sample and one counting pass, on the float32 bits of
// its values; false when the sample's brackets missed a statistic (or the CPU lacks AVX2),
// with nothing written.
template <class D>
class SampledStatistics {
 public:
  using Raw = typename D::Raw;
  SampledStatistics(const Problem& p, int64_t begin, int64_t end, int threads, SampledWorkspace& ws)
      : p_(p), x_(static_cast<const Raw*>(p.x)), begin_(begin), end_(end), threads_(threads), ws_(ws) {}

  bool run(Stats* st) {
    if (!use_avx2() || !sampling_enabled() || end_ - begin_ < kMinSampledGroup) return false;
    const bool exact = draw_sample() && bracket() && count() && resolve(st);
    // The fallback keeps results right whatever the counting pass miscounted, and so hides it:
    // tests on ordinary data set $ARMQUANT_SAMPLE_STRICT, which makes a fallback an error.
    if (!exact && std::getenv("ARMQUANT_SAMPLE_STRICT")) throw std::logic_error("ARM sampled statistics fell back");
    return exact;
  }

 private:
  static constexpr uint32_t kAbsBins = 32768, kRawBins = 65536;  // keys >> 16
  static constexpr uint32_t kFiniteBins = kFiniteKeys >> 16;      // |x| bins of finite values

  // Counts per raw bin of the finite values in kSampleRuns runs of kSampleRun elements,
  // one in each stride of the group, at a scrambled offset: activations vary by channel, and
  // runs at one offset would see the same channels whenever the stride is a multiple of them.
  bool draw_sample() {
    const size_t T = static_cast<size_t>(threads_);
    if (ws_.hist.size() != T * kRawBins || ws_.hist_dirty) ws_.hist.assign(T * kRawBins, 0u);
    ws_.hist_dirty = true;
    const int64_t stride = (end_ - begin_) / kSampleRuns;
    auto run_start = [&](int64_t j) {
      const uint64_t scrambled = (static_cast<uint64_t>(j) * 0x9e3779b97f4a7c15ull) >> 32;
      return begin_ + j * stride + static_cast<int64_t>(scrambled % static_cast<uint64_t>(stride - kSampleRun + 1));
    };
    std::vector<uint32_t> lowest(T, kAbsBins), highest(T, 0);  // the |x| bins each thread touched
    std::atomic<int64_t> next_run{0};
    run_threads(threads_, [&](int t) {
      uint32_t* hist = ws_.hist.data() + static_cast<size_t>(t) * kRawBins;
      uint32_t lo = kAbsBins, hi = 0;
      take_blocks(next_run, kSampleRuns, kSampleRuns / 32, [&](int64_t first, int64_t last) {
        for (int64_t j = first; j < last; ++j) {
          // The runs lie far apart: ask for a later one's lines now, or each waits on memory.
          if (j + kSampleAhead < kSampleRuns) {
            const Raw* ahead = x_ + run_start(j + kSampleAhead);
            for (int64_t line = 0; line < kSampleRun; line += 64 / static_cast<int64_t>(sizeof(Raw)))
              __builtin_prefetch(ahead + line);
          }
          const int64_t b = run_start(j);
          for_valid_ranges(p_, b, b + kSampleRun, [&](int64_t from, int64_t to) {
            uint32_t widened[kSampleRun];
            sample_run(float32_bits<D>(x_ + from, to - from, widened), to - from, hist, &lo, &hi);
          });
        }
      });
      lowest[t] = lo, highest[t] = hi;
    });
    // Sum the threads' counts of the touched bins, clearing them for the next call. Bins of
    // NaN and Inf (kFiniteBins and up) are cleared and left out.
    const uint32_t lo = *std::min_element(lowest.begin(), lowest.end());
    const uint32_t hi = *std::max_element(highest.begin(), highest.end());
    first_bin_ = lo;
    const uint32_t end = lo > hi ? lo : std::min(hi + 1, kFiniteBins);  // past the last finite bin
    const size_t bins = end > lo ? end - lo : 0;
    ws_.below_abs.assign(bins + 1, 0u), ws_.below_pos.assign(bins + 1, 0u), ws_.below_neg.assign(bins + 1, 0u);
    for (uint32_t h = lo; h <= hi; ++h) {
      uint32_t pos = 0, neg = 0;
      for (size_t t = 0; t < T; ++t) {
        uint32_t* hist = ws_.hist.data() + t * kRawBins;
        pos += hist[h], neg += hist[0x8000u | h];
        hist[h] = hist[0x8000u | h] = 0;
      }
      if (h >= end) continue;
      const size_t k = h - lo;
      ws_.below_pos[k + 1] = ws_.below_pos[k] + pos;
      ws_.below_neg[k + 1] = ws_.below_neg[k] + neg;
      ws_.below_abs[k + 1] = ws_.below_pos[k + 1] + ws_.below_neg[k + 1];
    }
    ws_.hist_dirty = false;
    n_sample_ = ws_.below_abs.back();
    n_negative_ = ws_.below_neg.back();
    return n_sample_ >= kSampleRun;  // else mostly masked or non-finite: too little to go on
  }

  int64_t sample_rank(double f) const {
    return std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(std::floor(f * n_sample_)), 0), n_sample_ - 1);
  }
  // Sampled values in the |x| bins below h.
  int64_t sampled_below(uint32_t h) const {
    return h <= first_bin_ ? 0 : ws_.below_abs[std::min<size_t>(h - first_bin_, ws_.below_abs.size() - 1)];
  }
  // The |x| bin of the value of rank r (r < its count) in a cumulative count `below`.
  uint32_t bin_of_rank(const std::vector<uint32_t>& below, int64_t r) const {
    return first_bin_ + static_cast<uint32_t>(std::upper_bound(below.begin(), below.end(), static_cast<uint32_t>(r)) -
                                              below.begin() - 1);
  }
  // The |x| bin that holds the sample's value of quantile f.
  uint32_t abs_bin_at(double f) const { return bin_of_rank(ws_.below_abs, sample_rank(f)); }
  // The signed bin (signed key >> 16) that holds the sample's value of quantile f: ascending
  // x runs through the negative values by descending |x| (signed bins 0x7fff - h), then the
  // positive ones (0x8000 + h).
  uint32_t signed_bin_at(double f) const {
    const int64_t r = sample_rank(f);
    if (r < n_negative_) return 0x7fffu - bin_of_rank(ws_.below_neg, n_negative_ - 1 - r);
    return 0x8000u + bin_of_rank(ws_.below_pos, r - n_negative_);
  }
  double margin(double f) const {
    f = std::min(std::max(f, 0.0), 1.0);
    const double n = static_cast<double>(n_sample_);
    return margin_scale_ * (4.8 * std::sqrt(std::max(f * (1.0 - f), 1.0 / n) / n) + 2.0 / n);
  }
  // |x| keys from the bin of quantile f1 - margin to that of f2 + margin.
  KeyInterval abs_around(double f1, double f2) const {
    return {abs_bin_at(f1 - margin(f1)) << 16, (abs_bin_at(f2 + margin(f2)) + 1) << 16};
  }
  static uint32_t abs_key(float v) { return v > 0 ? std::min(bits_of(v), kFiniteKeys) : 0u; }  // of v >= 0
  // Out to whole bins, and past float rounding.
  static uint32_t widen_down(uint32_t key) { return (key > 64 ? key - 64 : 0) & 0xffff0000u; }
  static uint32_t widen_up(uint32_t key) { return std::min((key + 64 + 0xffffu) & 0xffff0000u, kFiniteKeys); }

  // Bounds on the MAD about m0, from the sample's |x| bins: the rank (0.5 -/+ margin) n of
  // d = |a - m0| lies between the smallest r whose window [m0 - r, m0 + r] touches bins holding
  // more than that many values, and the smallest r whose window covers whole bins holding more.
  std::pair<float, float> sample_mad(float m0) const {
    auto within = [&](float r, bool whole) {  // sampled values in the window's bins
      const uint32_t lo = abs_key(m0 - r) >> 16, hi = std::min(abs_key(m0 + r) >> 16, kAbsBins - 1);
      if (!whole) return sampled_below(hi + 1) - sampled_below(lo);
      const uint32_t first = m0 - r <= 0 ? lo : lo + 1;  // bin 0 is whole once the window reaches 0
      return hi > first ? sampled_below(hi) - sampled_below(first) : int64_t{0};
    };
    auto smallest = [&](int64_t rank, bool whole) {  // the smallest r with within(r) > rank
      uint32_t lo = 0, hi = bits_of(std::numeric_limits<float>::max());
      while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (within(float_of(mid), whole) > rank) hi = mid;
        else lo = mid + 1;
      }
      return float_of(lo);
    };
    return {smallest(sample_rank(0.5 - margin(0.5)), false), smallest(sample_rank(0.5 + margin(0.5)), true)};
  }

  // The intervals, from the sample: each statistic's range, and the ranges of the values it
  // depends on.
  bool bracket() {
    const armq_attrs& at = p_.attrs;
    // m: rank (N - 1) / 2.
    m_ = abs_around(0.5, 0.5);
    const float m_lo = float_of(m_.lo), m_hi = float_of(m_.hi - 1);
    // The MAD. m - MAD(m) and m + MAD(m) never fall as m rises (each d moves no more than
    // m does), so m's range and the MAD's at its two ends bound both.
    const auto [mad_lo_at_lo, mad_hi_at_lo] = sample_mad(m_lo);
    const auto [mad_lo_at_hi, mad_hi_at_hi] = sample_mad(m_hi);
    below_m_ = {widen_down(abs_key(m_lo - mad_hi_at_lo)), widen_up(abs_key(m_hi - mad_lo_at_hi) + 1)};
    above_m_ = {widen_down(abs_key(m_lo + mad_lo_at_lo)), widen_up(abs_key(m_hi + mad_hi_at_hi) + 1)};
    std::vector<KeyInterval> wanted = {m_, below_m_, above_m_};
    // eps, and the share moved that count(a < eps) gives.
    double frac_lo, frac_hi;
    if (at.share_fixed) {
      frac_lo = frac_hi = std::min(std::max(static_cast<double>(at.c), 0.0), 1.0);
    } else {
      const float eps_lo = epsilon(at, std::min(mad_lo_at_lo, mad_lo_at_hi));
      const float eps_hi = epsilon(at, std::max(mad_hi_at_lo, mad_hi_at_hi));
      if (!(eps_lo >= 0 && eps_lo <= eps_hi && std::isfinite(eps_hi) && at.k >= 0)) return false;
      eps_ = {widen_down(abs_key(eps_lo)), widen_up(abs_key(eps_hi) + 1)};
      wanted.push_back(eps_);
      const double n = static_cast<double>(n_sample_);
      const double near_lo = sampled_below(eps_.lo >> 16) / n, near_hi = sampled_below(((eps_.hi - 1) >> 16) + 1) / n;
      auto share = [&](double near) {
        return std::min(std::max(static_cast<double>(at.k) * near, static_cast<double>(at.pmin)),
                        static_cast<double>(at.pmax));
      };
      frac_lo = share(near_lo - margin(near_lo));
      frac_hi = share(near_hi + margin(near_hi));
    }
    t_ = abs_around(frac_lo, frac_hi);  // rank n - 1 of |x|
    wanted.push_back(t_);
    const double q = static_cast<double>(at.p1) / 100.0;
    if (at.percentile_abs) {
      p_abs_ = abs_around(q, q);
      wanted.push_back(p_abs_);
    } else {
      set_.has_signed = true;
      set_.signed_keys = {signed_bin_at(q - margin(q)) << 16, (signed_bin_at(q + margin(q)) + 1) << 16};
    }
    // Disjoint and ascending, for the counting pass.
    std::sort(wanted.begin(), wanted.end(), [](KeyInterval a, KeyInterval b) { return a.lo < b.lo; });
    for (const KeyInterval& w : wanted) {
      if (set_.n_abs > 0 && w.lo <= set_.abs[set_.n_abs - 1].hi)
        set_.abs[set_.n_abs - 1].hi = std::max(set_.abs[set_.n_abs - 1].hi, w.hi);
      else
        set_.abs[set_.n_abs++] = w;
    }
    fit_to_byte_keys(set_);
    return true;
  }

  // The pass over x, in blocks that the threads take as they go: each thread's counts and
  // kept values are of the blocks it took, in no particular order (no statistic needs one).
  bool count() {
    const CountAndKeep count_and_keep = count_and_keep_for(set_);
    counts_.assign(threads_, IntervalCounts{});
    if (ws_.kept.size() < static_cast<size_t>(threads_))
      ws_.kept.resize(threads_), ws_.parts.resize(threads_), ws_.widened.resize(threads_);
    std::atomic<int64_t> next{begin_};
    run_threads(threads_, [&](int t) {
      std::vector<uint32_t>& out = ws_.kept[t];
      IntervalCounts& c = counts_[t];
      // Each block's kept values are split while they are still in cache.
      out.resize(std::max<size_t>(out.size(), kPieceMax + 32));
      uint32_t* widened = nullptr;
      if (!std::is_same<D, Float32>::value) {
        ws_.widened[t].resize(kPieceMax);
        widened = ws_.widened[t].data();
      }
      take_blocks(next, end_, kPieceMax, [&](int64_t b, int64_t e) {
        c.kept = 0;
        for_valid_ranges(p_, b, e, [&](int64_t lo, int64_t hi) {
          count_and_keep(float32_bits<D>(x_ + lo, hi - lo, widened), hi - lo, set_, &c, out.data());
        });
        (use_avx512() ? split_by_interval_avx512 : split_by_interval_avx2)(out.data(), c.kept, set_,
                                                                          ws_.parts[t].data(), c.inside);
      });
    });
    for (const IntervalCounts& c : counts_) {
      if (c.non_finite) return false;
      n_valid_ += c.valid;
      for (int i = 0; i < set_.n_abs; ++i) below_[i] += c.below[i];
      below_signed_ += c.below_signed;
    }
    return n_valid_ > 0;
  }

  // Index of the counting interval that holds interval w.
  int interval_of(KeyInterval w) const {
    for (int i = 0; i < set_.n_abs; ++i)
      if (set_.abs[i].contains(w.lo)) return i;
    throw std::logic_error("ARM bracket outside the counting intervals");
  }

  // Keys that each thread holds, in its own memory: kept values of one counting segment, or
  // the d's of the MAD.
  struct KeySpan {
    const uint32_t* keys;
    size_t n;
  };
  std::vector<KeySpan> segment_spans(int segment) const {
    std::vector<KeySpan> spans(threads_);
    for (int t = 0; t < threads_; ++t)
      spans[t] = {ws_.parts[t][segment].data(), static_cast<size_t>(counts_[t].inside[segment])};
    return spans;
  }
  // The counting segment of an interval inside one, or the signed one.
  int segment_of(KeyInterval w, bool signed_keys) const { return signed_keys ? set_.n_abs : interval_of(w); }

  // The kept keys of a segment below each of keys, over all threads (one pass per thread).
  template <size_t K>
  std::array<int64_t, K> below_keys(int segment, const std::array<uint32_t, K>& keys) {
    const std::vector<KeySpan> spans = segment_spans(segment);
    std::vector<std::array<int64_t, K>> below(threads_);
    run_threads(threads_, [&](int t) {
      for (size_t i = 0; i < K; ++i) below[t][i] = count_below(spans[t].keys, static_cast<int64_t>(spans[t].n), keys[i]);
    });
    std::array<int64_t, K> total{};
    for (const auto& b : below)
      for (size_t i = 0; i < K; ++i) total[i] += b[i];
    return total;
  }
  static int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

  // Rank k of the keys of spans (all inside w); false when fewer than k + 1. Large ones take
  // their first round of sixteenths on each thread's own keys, in parallel, and gather only
  // the part that holds rank k.
  bool kth_across(const std::vector<KeySpan>& spans, KeyInterval w, int64_t k, uint32_t* key) {
    size_t total = 0;
    for (const KeySpan& span : spans) total += span.n;
    if (k < 0 || static_cast<int64_t>(total) <= k) return false;
    size_t n = 0;
    if (total < kParallelSelection || !Sixteenths::worth_it(w)) {
      ws_.keys.resize(std::max(ws_.keys.size(), total));
      for (const KeySpan& span : spans) {
        std::copy(span.keys, span.keys + span.n, ws_.keys.data() + n);
        n += span.n;
      }
    } else {
      const Sixteenths cut(w);
      std::vector<std::array<int64_t, Sixteenths::kParts>> below(threads_);
      run_threads(threads_, [&](int t) { count_by_sixteenths(spans[t].keys, spans[t].n, cut, below[t].data()); });
      int64_t all_below[Sixteenths::kParts] = {}, before;
      for (const auto& b : below)
        for (int i = 0; i < Sixteenths::kParts; ++i) all_below[i] += b[i];
      const int s = part_holding(all_below, k, &before);
      w = cut.part(s);
      k -= before;
      // Each thread writes its keys in the part at its own offset, 16 slots apart for the
      // vector stores' overrun; then the blocks close up.
      std::vector<size_t> offset(threads_ + 1, 0), in_part(threads_);
      for (int t = 0; t < threads_; ++t) {
        in_part[t] = static_cast<size_t>(below[t][s] - (s > 0 ? below[t][s - 1] : 0));
        offset[t + 1] = offset[t] + in_part[t] + 16;
      }
      ws_.keys.resize(std::max(ws_.keys.size(), offset[threads_]));
      run_threads(threads_, [&](int t) { keys_in(spans[t].keys, spans[t].n, w, ws_.keys.data() + offset[t]); });
      for (int t = 0; t < threads_; ++t) {
        std::memmove(ws_.keys.data() + n, ws_.keys.data() + offset[t], in_part[t] * sizeof(uint32_t));
        n += in_part[t];
      }
    }
    *key = kth_key_avx2(ws_.keys.data(), n, w, k, kDirectSelection);
    return true;
  }
  bool kth_in_segment(KeyInterval w, bool signed_keys, int64_t k, uint32_t* key) {
    return kth_across(segment_spans(segment_of(w, signed_keys)), w, k, key);
  }

  bool resolve(Stats* st) {
    const armq_attrs& at = p_.attrs;
    const int64_t N = n_valid_, rank = (N - 1) / 2;
    const int im = interval_of(m_);
    uint32_t key;
    if (!kth_in_segment(set_.abs[im], false, rank - below_[im], &key)) return false;
    const float m = float_of(key);
    float mad;
    if (!resolve_mad(m, rank, &mad)) return false;
    // eps and n.
    int64_t near = 0;
    if (!at.share_fixed) {
      const uint32_t eps_key = abs_key(epsilon(at, mad));
      const int ie = interval_of(eps_);
      const KeyInterval e = set_.abs[ie];
      if (!(eps_key >= e.lo && eps_key <= e.hi)) return false;
      near = below_[ie] + below_keys<1>(ie, {eps_key})[0];
    }
    const int64_t n = moved_count(at, N, near);
    // The threshold, rank n - 1 of |x|, and how many of its ties move.
    const int it = interval_of(t_);
    if (!kth_in_segment(set_.abs[it], false, n - 1 - below_[it], &key)) return false;
    const uint32_t t_key = key;
    const std::array<int64_t, 2> below_t_and_after = below_keys<2>(it, {t_key, t_key + 1});
    const int64_t below_t = below_[it] + below_t_and_after[0];
    const int64_t ties = below_t_and_after[1] - below_t_and_after[0];
    // Qp.
    const PercentileRanks pr = percentile_ranks(at, N);
    float v[2];
    const int64_t ranks[2] = {pr.lo_index, pr.hi_index};
    for (int i = 0; i < 2; ++i) {
      if (at.percentile_abs) {
        const int ip = interval_of(p_abs_);
        if (!kth_in_segment(set_.abs[ip], false, ranks[i] - below_[ip], &key)) return false;
        v[i] = float_of(key);
      } else {
        if (!kth_in_segment(set_.signed_keys, true, ranks[i] - below_signed_, &key)) return false;
        v[i] = from_signed_key(key);
      }
    }
    // Mneg = |min x| when some x < 0: the largest raw bits, when they are negative (all
    // values are finite here). Without a negative value only x < 0 would take Mneg, and
    // there are none.
    uint32_t largest_raw = 0;
    for (const IntervalCounts& c : counts_) largest_raw = std::max(largest_raw, c.largest_raw);
    const uint32_t max_negative = largest_raw >> 31 ? largest_raw & 0x7fffffffu : 0u;
    st->n_valid = N;
    st->threshold = float_of(t_key);
    st->tie_quota = n - below_t;
    st->ties = ties;
    st->q_p = interpolate(pr, v[0], v[1]);
    st->m_neg = float_of(max_negative);
    return true;
  }

  // The MAD, rank `rank` of d = |a - m|. The kept values of the intervals around m - MAD and
  // m + MAD give their d exactly. Every other stretch of |x| keys (another interval with the
  // gap after it, or a gap) has a known count and d-bounds from its ends: those between the
  // two intervals lie at or below cut_lo (the largest of their bounds), those outside at or
  // above cut_hi (the smallest); the sample's bracket at m may narrow both. The MAD is exact
  // when its rank falls among the exact d's in (cut_lo, cut_hi].
  bool resolve_mad(float m, int64_t rank, float* mad) {
    const int ib = interval_of(below_m_), ia = interval_of(above_m_);
    int64_t in_exact[kMaxIntervals] = {};  // elements of the two intervals, all kept
    for (const IntervalCounts& c : counts_) {
      in_exact[ib] += c.inside[ib];
      if (ia != ib) in_exact[ia] += c.inside[ia];
    }
    int64_t low = 0;
    float cut_lo = -1, cut_hi = std::numeric_limits<float>::infinity();
    auto stretch = [&](uint32_t lo, uint32_t hi, int64_t count) {
      if (count == 0) return;
      const float a_min = float_of(lo), a_max = float_of(hi - 1);
      float dmin, dmax;
      if (a_max < m) dmin = m - a_max, dmax = m - a_min;
      else if (a_min > m) dmin = a_min - m, dmax = a_max - m;
      else dmin = 0, dmax = std::max(m - a_min, a_max - m);
      if (ia != ib && lo >= set_.abs[ib].hi && hi <= set_.abs[ia].lo) {
        low += count;
        cut_lo = std::max(cut_lo, dmax);
      } else {
        cut_hi = std::min(cut_hi, dmin);
      }
    };
    stretch(0, set_.abs[0].lo, below_[0]);
    for (int i = 0; i < set_.n_abs; ++i) {
      const uint32_t next = i + 1 < set_.n_abs ? set_.abs[i + 1].lo : kFiniteKeys;
      const int64_t count = (i + 1 < set_.n_abs ? below_[i + 1] : n_valid_) - below_[i];
      if (i == ib || i == ia) stretch(set_.abs[i].hi, next, count - in_exact[i]);
      else stretch(set_.abs[i].lo, next, count);
    }
    // Now that m is exact, the sample brackets the MAD more closely than the intervals do.
    const auto [sample_lo, sample_hi] = sample_mad(m);
    cut_lo = std::max(cut_lo, sample_lo);
    cut_hi = std::min(cut_hi, sample_hi);
    if (!(cut_lo < cut_hi)) return false;
    // The exact d's in (cut_lo, cut_hi], straight from the two intervals' kept keys, each
    // thread from its own.
    const int exact[2] = {ib, ia};
    if (ws_.distances.size() < static_cast<size_t>(threads_)) ws_.distances.resize(threads_);
    std::vector<KeySpan> mid(threads_);
    std::vector<int64_t> low_of(threads_, 0);
    run_threads(threads_, [&](int t) {
      const IntervalCounts& c = counts_[t];
      std::vector<uint32_t>& d = ws_.distances[t];
      d.resize(static_cast<size_t>(c.inside[ib] + (ia != ib ? c.inside[ia] : 0)) + 8);
      size_t n = 0;
      for (int e = 0; e < (ia == ib ? 1 : 2); ++e) {
        const int i = exact[e];
        n += distances_avx2(ws_.parts[t][i].data(), static_cast<size_t>(c.inside[i]), m, cut_lo,
                            cut_hi, &low_of[t], d.data() + n);
      }
      mid[t] = {d.data(), n};
    });
    low += sum(low_of);
    const uint32_t mid_lo = cut_lo < 0 ? 0u : bits_of(cut_lo) + 1;
    uint32_t key;
    if (!kth_across(mid, {mid_lo, bits_of(cut_hi) + 1}, rank - low, &key)) return false;
    *mad = float_of(key);
    return true;
  }

  const Problem& p_;
  const Raw* x_;
  int64_t begin_, end_;
  int threads_;
  SampledWorkspace& ws_;
  const double margin_scale_ = sample_margin_scale();
  int64_t n_sample_ = 0, n_negative_ = 0;  // finite sampled values, and the negative ones
  uint32_t first_bin_ = 0;                 // the lowest |x| bin sampled: see SampledWorkspace
  // Brackets of |x| keys: of m, of the values whose d can be the MAD, of eps, t and Qp.
  KeyInterval m_{0, 0}, below_m_{0, 0}, above_m_{0, 0}, eps_{0, 0}, t_{0, 0}, p_abs_{0, 0};
  IntervalSet set_;
  // The counting pass.
  std::vector<IntervalCounts> counts_;
  int64_t n_valid_ = 0, below_[kMaxIntervals] = {}, below_signed_ = 0;
};
#endif

// The statistics of a large float32 or float16 group from a sample, where that works (see above).
template <class D>
bool sampled_statistics(const Problem& p, int64_t begin, int64_t end, int threads, SampledWorkspace& ws, Stats* st) {
#if defined(__x86_64__) || defined(__i386__)
  return SampledStatistics<D>(p, begin, end, threads, ws).run(st);
#else
  (void)p, (void)begin, (void)end, (void)threads, (void)ws, (void)st;
  return false;
#endif
}

// ---- large groups: one histogram, the exact values of a few bins, one selection pass ------

constexpr int kRawBins = 65536;  // bins of the raw high 16 bits: sign, exponent, top mantissa
constexpr int64_t kSelectBlock = 1 << 15;     // elements per block of the selection pass
constexpr int64_t kHistogramBlock = 1 << 16;  // and of the 16-bit histogram pass

struct LargeGroupDBin {  // a |x| bin and bounds on its d = |a - m|
  uint32_t a;
  int64_t count;
  float dmin, dmax;
};

// The histograms of LargeGroup, kept by the calling thread from call to call: fresh pages
// of this size would cost more than the pass that fills them.
// The indices r < n (ascending; n a multiple of 8) with count[r] != 0, into *bins. A group's
// values touch a few thousand of the 65536 bins, so eight at a time are skipped with one test.
inline void nonzero_bins(const uint64_t* count, uint32_t n, std::vector<uint32_t>* bins) {
  bins->resize(n);
  uint32_t* out = bins->data();
  size_t k = 0;
  for (uint32_t r = 0; r < n; r += 8) {
    uint64_t any = 0;
    for (uint32_t i = 0; i < 8; ++i) any |= count[r + i];
    if (!any) continue;
    for (uint32_t i = 0; i < 8; ++i) {
      out[k] = r + i;
      k += count[r + i] != 0;
    }
  }
  bins->resize(k);
}

struct LargeGroupWorkspace {
  std::vector<uint32_t> local, local_odd;    // per thread, per raw bin (see histogram())
  std::vector<uint64_t> hist_raw, hist_abs;  // all threads, per raw bin and per |x| bin
  std::vector<uint32_t> raw_bins, abs_bins;  // the non-empty bins, ascending
  std::vector<int32_t> gathered_of_raw;      // index in LargeGroup::gathered_, or -1
  std::vector<LargeGroupDBin> d_bins;        // scratch of mad_range
  SampledWorkspace sampled;                  // of the float32 and float16 path that tries a sample first
};

// One group too large for scratch copies. Passes over x, each split across threads, thread t
// always taking the same contiguous chunk so that per-thread counts line up across passes:
//   1. a histogram of the raw high 16 bits of every element. It orders |x| and x at bin
//      resolution, and is exact for the 16-bit dtypes, whose bins hold one value each.
//   2. (float32 only) gathering the values of the bins that the statistics fall in. The
//      statistics depend on each other (m, then the MAD, eps, n and the threshold), so each
//      is carried as a range of values: from the histogram alone the first round asks for
//      every bin that any median inside the median's bin could lead to (18 |x| bins holding
//      2.6% of 29M Gaussian values), and a second round finds every statistic exact. Rounds
//      repeat until it does, so the bounds decide speed, never the result.
//   3. copy x to y and move the selected elements.
template <class D>
class LargeGroup {
 public:
  using Raw = typename D::Raw;

  LargeGroup(const Problem& p, int64_t begin, int64_t end, int threads, LargeGroupWorkspace& ws)
      : p_(p), x_(static_cast<const Raw*>(p.x)), begin_(begin), end_(end), threads_(threads), ws_(ws) {}

  void run() {
    Stats st;
    bool sampled = false;
    // float16 only up to kMaxSampledHalfGroup elements, and never bfloat16: their histogram
    // pass needs no second pass (a bin is a value), and beyond the cache it costs less than the
    // sample and the counting pass (see kMaxSampledHalfGroup); bfloat16's few bins an octave
    // keep it cheap at any size (1.02x-1.27x the time with the sample).
    if constexpr (!std::is_same<D, BFloat16>::value)
      if (std::is_same<D, Float32>::value || end_ - begin_ <= kMaxSampledHalfGroup)
        sampled = sampled_statistics<D>(p_, begin_, end_, threads_, ws_.sampled, &st);
    if (!sampled) {
      histogram();
      if (n_valid_ > 0) {
        std::vector<uint32_t> need;
        while (!resolve(&st, &need)) {
          collect(need);
          need.clear();
        }
      }
    }
    if (st.tie_quota == st.ties) {  // every a <= t moves: blocks in any order, taken as threads come free
      std::atomic<int64_t> next{begin_};
      const TieShare all{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max()};
      run_threads(threads_, [&](int) {
        take_blocks(next, end_, kSelectBlock, [&](int64_t b, int64_t e) { select_and_move<D>(p_, b, e, st, all); });
      });
      return;
    }
    // Only the first tie_quota ties in flat order move: each thread's chunk takes its share.
    const std::vector<TieShare> quota =
        tie_shares(sampled || kPoint ? count_ties(st.threshold) : ties_per_thread(st.threshold), st.tie_quota);
    run_threads(threads_, [&](int t) {
      int64_t b, e;
      chunk(t, &b, &e);
      select_and_move<D>(p_, b, e, st, quota[t]);
    });
  }

 private:
  // Bins: raw bin R (16 bits) holds the elements whose raw high half is R; |x| bin A (15
  // bits) is raw bins A and A | 0x8000. Ascending x runs through the negative raw bins from
  // the top down, then the positive ones.
  static constexpr bool kPoint = D::kExactHigh;  // every bin holds one value
  static uint32_t first_key(uint32_t bin) { return kPoint ? bin : bin << 16; }
  static uint32_t last_key(uint32_t bin) { return kPoint ? bin : (bin << 16) | 0xffffu; }
  static float abs_value(uint32_t akey) { return D::from_akey(akey); }
  static uint32_t raw_high(Raw r) { return D::kExactHigh ? r : static_cast<uint32_t>(r) >> 16; }
  static bool finite_bin(uint32_t high) { return D::finite(static_cast<Raw>(D::kExactHigh ? high : high << 16)); }

  struct Range {  // a statistic known to lie in [lo, hi]; exact when lo == hi
    float lo, hi;
    bool exact() const { return lo == hi; }
  };

  // Pass 1.
  // bfloat16 values (7 mantissa bits) are few and hot: neighbours often share a bin, and one
  // counter incremented back to back made the histogram loop up to 1.4x slower, by where the
  // code happened to land. So odd elements count in a histogram of their own there. float16's
  // 10 bits spread the counts over 8x more bins, where a second histogram only adds cache
  // misses (6% slower); float32 measured the same either way.
  static constexpr bool kOddApart = std::is_same<D, BFloat16>::value;

  void histogram() {
    const size_t T = static_cast<size_t>(threads_);
    ws_.local.resize(T * kRawBins);
    if (kOddApart) ws_.local_odd.resize(T * kRawBins);
    // 16-bit bins are points: nothing later needs a thread's counts to be of its own chunk, so
    // the threads take blocks as they come free. float32 gathers its bins' values by chunk,
    // sized by each thread's counts.
    std::atomic<int64_t> next{begin_};
    run_threads(threads_, [&](int t) {
      uint32_t* h = &ws_.local[t * static_cast<size_t>(kRawBins)];
      uint32_t* h_odd = kOddApart ? ws_.local_odd.data() + t * static_cast<size_t>(kRawBins) : nullptr;
      std::fill(h, h + kRawBins, 0u);
      if (kOddApart) std::fill(h_odd, h_odd + kRawBins, 0u);
      auto count = [&](int64_t b, int64_t e) {
        for_valid_ranges(p_, b, e, [&](int64_t lo, int64_t hi) {
          int64_t i = lo;
          if (kOddApart)
            for (; i + 2 <= hi; i += 2) {
              ++h[raw_high(x_[i])];
              ++h_odd[raw_high(x_[i + 1])];
            }
          for (; i < hi; ++i) ++h[raw_high(x_[i])];
        });
      };
      if (kPoint) {
        take_blocks(next, end_, kHistogramBlock, count);
      } else {
        int64_t b, e;
        chunk(t, &b, &e);
        count(b, e);
      }
      if (kOddApart)
        for (int r = 0; r < kRawBins; ++r) h[r] += h_odd[r];
    });
    // Simple loops over all bins, which the compiler vectorises.
    ws_.hist_raw.resize(kRawBins);
    uint64_t* raw = ws_.hist_raw.data();
    for (int r = 0; r < kRawBins; ++r) raw[r] = ws_.local[r];
    for (size_t t = 1; t < T; ++t)
      for (int r = 0; r < kRawBins; ++r) raw[r] += ws_.local[t * kRawBins + r];
    // NaN and Inf take no part in any statistic: their bins top each sign's range.
    static const uint32_t non_finite = [] {
      uint32_t r = 0;
      while (finite_bin(r)) ++r;
      return r;
    }();
    for (uint32_t sign : {0u, 0x8000u})
      for (uint32_t r = non_finite | sign; r <= (0x7fffu | sign); ++r) {
        raw[r] = 0;
        for (size_t t = 0; t < T; ++t) ws_.local[t * kRawBins + r] = 0;
      }
    ws_.hist_abs.resize(kRawBins / 2);
    for (int a = 0; a < kRawBins / 2; ++a) ws_.hist_abs[a] = raw[a] + raw[a + kRawBins / 2];  // a | 0x8000, vectorised
    nonzero_bins(raw, kRawBins, &ws_.raw_bins);
    nonzero_bins(ws_.hist_abs.data(), kRawBins / 2, &ws_.abs_bins);
    n_valid_ = std::accumulate(ws_.hist_abs.begin(), ws_.hist_abs.end(), int64_t{0});
    ws_.gathered_of_raw.assign(kRawBins, -1);
  }

  // Every statistic of the spec, as far as the histogram and the gathered bins pin it down.
  // Returns true with st filled once all are exact; else adds to need the raw bins whose
  // values would narrow them.
  bool resolve(Stats* st, std::vector<uint32_t>* need) {
    const armq_attrs& at = p_.attrs;
    const int64_t N = n_valid_, rank = (N - 1) / 2;
    const Range m = rank_abs(rank, rank, need);
    const Range mad = mad_range(m, rank, need);
    Range eps{epsilon(at, mad.lo), epsilon(at, mad.hi)};
    if (eps.hi < eps.lo) std::swap(eps.lo, eps.hi);
    int64_t near_lo, near_hi;
    count_abs_below(eps, &near_lo, &near_hi, need);
    int64_t n_lo = moved_count(at, N, near_lo), n_hi = moved_count(at, N, near_hi);
    if (n_hi < n_lo) std::swap(n_lo, n_hi);
    const Range t = rank_abs(n_lo - 1, n_hi - 1, need);
    const PercentileRanks pr = percentile_ranks(at, N);
    const bool abs_pool = at.percentile_abs;
    const Range v_lo = abs_pool ? rank_abs(pr.lo_index, pr.lo_index, need) : rank_signed(pr.lo_index, need);
    const Range v_hi = abs_pool ? rank_abs(pr.hi_index, pr.hi_index, need) : rank_signed(pr.hi_index, need);
    const Range x_min = rank_signed(0, need);
    if (!need->empty()) return false;
    if (!(m.exact() && mad.exact() && t.exact() && v_lo.exact() && v_hi.exact() && x_min.exact()) || n_lo != n_hi)
      throw std::logic_error("ARM statistics left inexact with nothing more to gather");
    st->n_valid = N;
    st->threshold = t.lo;
    st->q_p = interpolate(pr, v_lo.lo, v_hi.lo);
    st->m_neg = std::fabs(x_min.lo);
    int64_t below, unused;
    count_abs_below({t.lo, t.lo}, &below, &unused, need);
    st->tie_quota = n_lo - below;
    const std::vector<int64_t> ties = ties_per_thread(t.lo);
    st->ties = std::accumulate(ties.begin(), ties.end(), int64_t{0});
    return true;
  }

  // The values of ranks k1..k2 (0-based, ascending) of |x|: exact when k1 == k2 and that
  // rank's bin is known exactly; every inexact bin among those ranks is needed.
  Range rank_abs(int64_t k1, int64_t k2, std::vector<uint32_t>* need) {
    Range out{0, 0};
    int64_t cum = 0;
    for (uint32_t a : ws_.abs_bins) {
      const int64_t c = static_cast<int64_t>(ws_.hist_abs[a]);
      if (cum + c > k1) {
        const Halves ex = exact_abs(a);
        if (!ex && !kPoint) need_abs(a, need);
        auto value_at = [&](int64_t k, bool upper) {
          if (kPoint) return abs_value(a);
          if (ex) return abs_value(key_at_rank(ex, k - cum));
          return abs_value(upper ? last_key(a) : first_key(a));
        };
        if (k1 >= cum) out.lo = value_at(k1, false);
        if (k2 < cum + c) {
          out.hi = value_at(k2, true);
          return out;
        }
      }
      cum += c;
    }
    throw std::logic_error("ARM rank beyond the group");
  }

  // The value of rank k (0-based, ascending) of x.
  Range rank_signed(int64_t k, std::vector<uint32_t>* need) {
    // Ascending x: the negative raw bins from the largest |x| down, then the positive ones.
    const std::vector<uint32_t>& bins = ws_.raw_bins;
    const size_t negatives = bins.end() - std::lower_bound(bins.begin(), bins.end(), 0x8000u);
    int64_t cum = 0;
    for (size_t i = 0; i < bins.size(); ++i) {
      const uint32_t r = i < negatives ? bins[bins.size() - 1 - i] : bins[i - negatives];
      const int64_t c = static_cast<int64_t>(ws_.hist_raw[r]);
      if (cum + c <= k) {
        cum += c;
        continue;
      }
      const bool negative = r & 0x8000u;
      const uint32_t a = r & 0x7fffu;
      if (kPoint) {
        const float v = negative ? -abs_value(a) : abs_value(a);
        return {v, v};
      }
      const int32_t g = ws_.gathered_of_raw[r];
      if (g < 0) {
        need->push_back(r);
        const float lo = abs_value(first_key(a)), hi = abs_value(last_key(a));
        return negative ? Range{-hi, -lo} : Range{lo, hi};
      }
      // A negative bin's |x| keys run against x.
      const Keys& keys = gathered_[g].keys;
      const float v = abs_value(keys[negative ? c - 1 - (k - cum) : k - cum]);
      return negative ? Range{-v, -v} : Range{v, v};
    }
    throw std::logic_error("ARM rank beyond the group");
  }

  // Bounds on count(a < v) for v in [v.lo, v.hi]: exact when v is exact and v's bin is known.
  void count_abs_below(Range v, int64_t* lo, int64_t* hi, std::vector<uint32_t>* need) {
    *lo = *hi = 0;
    for (uint32_t a : ws_.abs_bins) {
      const int64_t c = static_cast<int64_t>(ws_.hist_abs[a]);
      if (abs_value(last_key(a)) < v.lo) {
        *lo += c;
        *hi += c;
        continue;
      }
      if (!(abs_value(first_key(a)) < v.hi)) break;  // this bin and all above are >= v.hi
      if (kPoint) {  // its one value lies in [v.lo, v.hi)
        *hi += c;
      } else if (const Halves ex = exact_abs(a)) {
        *lo += count_below(*ex.pos, v.lo) + count_below(*ex.neg, v.lo);
        *hi += count_below(*ex.pos, v.hi) + count_below(*ex.neg, v.hi);
      } else {
        *hi += c;
        need_abs(a, need);
      }
    }
  }
  static int64_t count_below(const Keys& keys, float v) {
    return std::partition_point(keys.begin(), keys.end(), [v](uint32_t k) { return abs_value(k) < v; }) - keys.begin();
  }

  // The MAD, rank `rank` of d = |a - m|, for m in [m.lo, m.hi]. Each bin bounds its d over
  // its values and m's range (float rounding is monotone, so the ends give the bounds). The
  // MAD lies between rank `rank` of the lower bounds and that of the upper bounds; with m
  // exact and every bin straddling that bracket known exactly, a search inside it counts
  // their d exactly. Otherwise those bins are needed.
  using DBin = LargeGroupDBin;
  Range mad_range(Range m, int64_t rank, std::vector<uint32_t>* need) {
    std::vector<DBin>& bins = ws_.d_bins;
    bins.clear();
    size_t below_m = 0, above_m = 0;  // bins [0, below_m) lie below m's range, [above_m, end) above
    for (uint32_t a : ws_.abs_bins) {
      const float lo = abs_value(first_key(a)), hi = abs_value(last_key(a));
      const int64_t count = static_cast<int64_t>(ws_.hist_abs[a]);
      if (lo >= m.hi) {
        bins.push_back({a, count, lo - m.hi, hi - m.lo});
      } else if (hi <= m.lo) {
        bins.push_back({a, count, m.lo - hi, m.hi - lo});
        below_m = above_m = bins.size();
      } else {
        bins.push_back({a, count, 0.0f, std::max(hi - m.lo, m.hi - lo)});
        above_m = bins.size();
      }
    }
    const Range bracket{weighted_rank(bins, below_m, above_m, rank, [](const DBin& b) { return b.dmin; }),
                        weighted_rank(bins, below_m, above_m, rank, [](const DBin& b) { return b.dmax; })};
    if (bracket.exact()) return bracket;
    int64_t below = 0;  // elements whose d lies below the bracket
    std::vector<std::pair<const DBin*, Halves>> straddling;
    bool countable = m.exact();
    for (const DBin& b : bins) {
      if (b.dmax < bracket.lo) {
        below += b.count;
      } else if (b.dmin <= bracket.hi) {
        const Halves ex = b.dmin == b.dmax ? Halves{} : exact_abs(b.a);
        if (b.dmin == b.dmax || (m.exact() && ex)) {
          straddling.push_back({&b, ex});
        } else {
          countable = false;
          if (!kPoint && !ex) need_abs(b.a, need);
        }
      }
    }
    if (!countable) return bracket;
    auto at_most = [&](float t) {
      int64_t total = below;
      for (const auto& [b, ex] : straddling) {
        if (!ex) total += b->dmax <= t ? b->count : 0;
        else total += count_d_at_most(*ex.pos, m.lo, t) + count_d_at_most(*ex.neg, m.lo, t);
      }
      return total;
    };
    uint32_t lo = bits_of(bracket.lo), hi = bits_of(bracket.hi);  // non-negative: bits order like values
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (at_most(float_of(mid)) > rank) hi = mid;
      else lo = mid + 1;
    }
    return {float_of(lo), float_of(lo)};
  }
  // Rank `rank` of value(b) over bins weighted by count: below m the values fall with the
  // bin, above m they rise, so this merges two sorted runs and the few bins overlapping m.
  template <class Value>
  static float weighted_rank(const std::vector<DBin>& bins, size_t below_m, size_t above_m, int64_t rank,
                             Value value) {
    std::vector<std::pair<float, int64_t>> middle;
    for (size_t k = below_m; k < above_m; ++k) middle.push_back({value(bins[k]), bins[k].count});
    std::sort(middle.begin(), middle.end());
    size_t down = below_m, up = above_m, mid = 0;
    int64_t cum = 0;
    for (;;) {
      float v = std::numeric_limits<float>::infinity();
      int64_t c = 0;
      int from = -1;
      if (down > 0 && value(bins[down - 1]) < v) v = value(bins[down - 1]), c = bins[down - 1].count, from = 0;
      if (up < bins.size() && value(bins[up]) < v) v = value(bins[up]), c = bins[up].count, from = 1;
      if (mid < middle.size() && middle[mid].first < v) v = middle[mid].first, c = middle[mid].second, from = 2;
      if (from < 0) throw std::logic_error("ARM rank beyond the group");
      if (from == 0) --down;
      else if (from == 1) ++up;
      else ++mid;
      cum += c;
      if (cum > rank) return v;
    }
  }

  // Elements of an exact bin with |a - m| <= t: d falls towards m and rises beyond it.
  static int64_t count_d_at_most(const Keys& keys, float m, float t) {
    auto d = [m](uint32_t k) { return std::fabs(abs_value(k) - m); };
    const auto split = std::partition_point(keys.begin(), keys.end(), [m](uint32_t k) { return abs_value(k) < m; });
    const auto first_in = std::partition_point(keys.begin(), split, [&](uint32_t k) { return d(k) > t; });
    const auto last_in = std::partition_point(split, keys.end(), [&](uint32_t k) { return d(k) <= t; });
    return last_in - first_in;
  }

  void need_abs(uint32_t a, std::vector<uint32_t>* need) {
    need->push_back(a);
    need->push_back(a | 0x8000u);
  }

  // |x| bin a exactly, when both of its raw bins are gathered: the sorted |x| keys of its
  // positive and of its negative elements.
  struct Halves {
    const Keys* pos = nullptr;
    const Keys* neg = nullptr;
    explicit operator bool() const { return pos != nullptr; }
  };
  Halves exact_abs(uint32_t a) const {
    const int32_t pos = ws_.gathered_of_raw[a], neg = ws_.gathered_of_raw[a | 0x8000u];
    if (pos < 0 || neg < 0) return {};
    return {&gathered_[pos].keys, &gathered_[neg].keys};
  }
  // Rank k (0-based) of the two halves together.
  static uint32_t key_at_rank(const Halves& h, int64_t k) {
    if (h.neg->empty()) return (*h.pos)[k];
    if (h.pos->empty()) return (*h.neg)[k];
    uint32_t lo = std::min(h.pos->front(), h.neg->front()), hi = std::max(h.pos->back(), h.neg->back());
    while (lo < hi) {  // the smallest key with more than k keys at or below it
      const uint32_t mid = lo + (hi - lo) / 2;
      const int64_t at_most = (std::upper_bound(h.pos->begin(), h.pos->end(), mid) - h.pos->begin()) +
                              (std::upper_bound(h.neg->begin(), h.neg->end(), mid) - h.neg->begin());
      if (at_most > k) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  // The valid elements with a == t in each thread's chunk, counted in a pass over x (the
  // sampled path and the 16-bit histogram keep no per-chunk counts).
  std::vector<int64_t> count_ties(float t) {
    const uint32_t akey = D::akey(D::raw_of(t));
    std::vector<int64_t> ties(threads_, 0);
    run_threads(threads_, [&](int i) {
      int64_t b, e;
      chunk(i, &b, &e);
      for_valid_ranges(p_, b, e, [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) ties[i] += D::akey(x_[j]) == akey;
      });
    });
    return ties;
  }

  // The valid elements with a == t per thread: from its histogram (16-bit, of the blocks it
  // took, so only their sum means anything) or its gathered values (float32, by chunk).
  std::vector<int64_t> ties_per_thread(float t) {
    const uint32_t akey = D::akey(D::raw_of(t)), a = kPoint ? akey : akey >> 16;
    std::vector<int64_t> ties(threads_, 0);
    for (int i = 0; i < threads_; ++i) {
      if (kPoint) {
        for (uint32_t r : {a, a | 0x8000u}) ties[i] += static_cast<int64_t>(ws_.local[i * static_cast<size_t>(kRawBins) + r]);
      } else {
        for (const auto& staged : staged_[i])
          for (uint32_t raw : staged) ties[i] += (raw & 0x7fffffffu) == akey;
      }
    }
    return ties;
  }

  // Pass 2 (float32 only: 16-bit bins are points): the values of the needed raw bins.
  void collect(std::vector<uint32_t> need) {
    if constexpr (!kPoint) {
      std::sort(need.begin(), need.end());
      need.erase(std::unique(need.begin(), need.end()), need.end());
      std::vector<uint16_t> slot_of_raw(kRawBins, 0);  // 1 + index among this round's bins
      std::vector<uint32_t> fresh;                     // this round's raw bins
      for (uint32_t r : need) {
        if (ws_.gathered_of_raw[r] >= 0) continue;
        if (fresh.size() == 0xffffu) break;  // the rest in a later round
        ws_.gathered_of_raw[r] = static_cast<int32_t>(gathered_.size());
        gathered_.push_back({});
        fresh.push_back(r);
        slot_of_raw[r] = static_cast<uint16_t>(fresh.size());
      }
      // A vector test on the bins' |x| key ranges keeps a few elements per thread; an exact
      // check on their bins then drops the rest. Each range costs every element a few vector
      // operations, each element kept a few scalar ones: ranges merge across gaps that hold
      // fewer than 1/16 of the elements, and down to kMaxRanges.
      std::vector<std::pair<uint32_t, uint32_t>> ranges;  // [lo, hi) of |x| keys
      for (uint32_t r : fresh)
        if (ws_.hist_raw[r]) ranges.push_back({first_key(r & 0x7fffu), last_key(r & 0x7fffu) + 1});
      std::sort(ranges.begin(), ranges.end());
      std::vector<std::pair<uint32_t, uint32_t>> merged;
      for (const auto& r : ranges) {
        if (!merged.empty() && r.first <= merged.back().second) merged.back().second = std::max(merged.back().second, r.second);
        else merged.push_back(r);
      }
      auto gap_count = [&](size_t i) {  // elements between ranges i and i + 1
        int64_t count = 0;
        for (uint32_t a = merged[i].second >> 16; a < merged[i + 1].first >> 16; ++a) count += ws_.hist_abs[a];
        return count;
      };
      while (merged.size() > 1) {  // close the emptiest gap while it pays
        size_t best = 0;
        int64_t best_count = gap_count(0);
        for (size_t i = 1; i + 1 < merged.size(); ++i)
          if (const int64_t c = gap_count(i); c < best_count) best = i, best_count = c;
        if (merged.size() <= kMaxRanges && best_count >= n_valid_ / 16) break;
        merged[best].second = merged[best + 1].second;
        merged.erase(merged.begin() + best + 1);
      }
      uint32_t lo[kMaxRanges], hi[kMaxRanges];
      for (size_t i = 0; i < merged.size(); ++i) lo[i] = merged[i].first, hi[i] = merged[i].second;
      const int n_ranges = static_cast<int>(merged.size());
      if (n_ranges == 0) return;  // only empty bins: their keys are empty already
      staged_.resize(threads_);
      run_threads(threads_, [&](int t) {
        int64_t b, e;
        chunk(t, &b, &e);
        // Room for everything in the ranges, from this thread's histogram.
        size_t room = 8;
        const uint32_t* h = &ws_.local[t * static_cast<size_t>(kRawBins)];
        for (int i = 0; i < n_ranges; ++i)
          for (uint32_t a = lo[i] >> 16; a < hi[i] >> 16; ++a) room += h[a] + h[a | 0x8000u];
        std::vector<uint32_t> staged(room);
        size_t kept = 0;
        for_valid_ranges(p_, b, e, [&](int64_t first, int64_t stop) {
          const uint32_t* x = reinterpret_cast<const uint32_t*>(x_ + first);
#if defined(__x86_64__) || defined(__i386__)
          if (use_avx2()) {
            kept += keep_in_ranges_avx2(x, stop - first, lo, hi, n_ranges, staged.data() + kept);
            return;
          }
#endif
          for (int64_t i = 0; i < stop - first; ++i) {  // a table lookup per element, no branch
            staged[kept] = x[i];
            kept += slot_of_raw[x[i] >> 16] != 0;
          }
        });
        size_t exact = 0;
        for (size_t i = 0; i < kept; ++i) {
          staged[exact] = staged[i];
          exact += slot_of_raw[staged[i] >> 16] != 0;
        }
        staged.resize(exact);
        staged_[t].push_back(std::move(staged));
      });
      // The bins' |x| keys side by side in one pool (sizes from the histogram), each sorted.
      std::vector<size_t> offset(fresh.size() + 1, 0);
      for (size_t j = 0; j < fresh.size(); ++j) offset[j + 1] = offset[j] + ws_.hist_raw[fresh[j]];
      pools_.emplace_back(new uint32_t[std::max<size_t>(offset.back(), 1)]);
      uint32_t* pool = pools_.back().get();
      std::unique_ptr<uint32_t[]> scratch(new uint32_t[std::max<size_t>(offset.back(), 1)]);
      run_threads(threads_, [&](int t) {  // each thread places its values after earlier threads'
        std::vector<size_t> fill(fresh.size());
        for (size_t j = 0; j < fresh.size(); ++j) {
          fill[j] = offset[j];
          for (int u = 0; u < t; ++u) fill[j] += ws_.local[u * static_cast<size_t>(kRawBins) + fresh[j]];
        }
        for (uint32_t raw : staged_[t].back()) pool[fill[slot_of_raw[raw >> 16] - 1]++] = raw & 0x7fffffffu;
      });
      run_threads(std::max(1, std::min<int>(threads_, static_cast<int>(fresh.size()))), [&](int t) {
        const size_t workers = static_cast<size_t>(std::max(1, std::min<int>(threads_, static_cast<int>(fresh.size()))));
        for (size_t j = t; j < fresh.size(); j += workers) {
          sort_low_halves(pool + offset[j], offset[j + 1] - offset[j], scratch.get() + offset[j]);
          gathered_[ws_.gathered_of_raw[fresh[j]]].keys = {pool + offset[j], offset[j + 1] - offset[j]};
        }
      });
    }
  }

  void chunk(int t, int64_t* b, int64_t* e) const { thread_chunk(begin_, end_, threads_, t, b, e); }

  struct Gathered {
    Keys keys;  // the bin's |x| keys, ascending
  };

  const Problem& p_;
  const Raw* x_;
  int64_t begin_, end_;
  int threads_;
  LargeGroupWorkspace& ws_;
  int64_t n_valid_ = 0;
  std::vector<Gathered> gathered_;
  std::vector<std::unique_ptr<uint32_t[]>> pools_;          // storage of the gathered keys
  std::vector<std::vector<std::vector<uint32_t>>> staged_;  // per thread, per round: raw values gathered, in flat order
};

template <class D>
void forward(const Problem& p, int threads) {
  const int64_t total = p.B * p.S * p.I;
  const int64_t group_size = p.attrs.scope == ARMQ_SCOPE_TENSOR ? total
                             : p.attrs.scope == ARMQ_SCOPE_SEQUENCE ? p.S * p.I
                                                                     : p.I;
  if (total == 0) return;
  const int64_t groups = total / group_size;
  // The large-group path costs some 80 us more than the small one to start (65536-bin
  // histograms per thread) and then runs on every thread; the small one runs each group on
  // one thread, at about 4 ns an element. Where the groups would leave threads idle (a short
  // prompt in scope sequence) it pays from 2^15 elements: [1, 64, 1536] float32 takes 180 us
  // against 500 on a Zen 5 with 2 threads. Where they keep every thread busy, only from 2^17.
  constexpr int64_t kLargeGroup = 1 << 17, kLargeGroupIdleThreads = 1 << 15;
  const bool large = group_size >= kLargeGroup || (groups < threads && group_size >= kLargeGroupIdleThreads);
  // Threads only pay off on enough work; a decode step stays on the calling thread.
  const int64_t useful = std::max<int64_t>(1, total / (1 << 15));
  threads = static_cast<int>(std::min<int64_t>(threads, useful));
  if (large) {
    static thread_local LargeGroupWorkspace workspace;
    for (int64_t g = 0; g < groups; ++g) LargeGroup<D>(p, g * group_size, (g + 1) * group_size, threads, workspace).run();
    return;
  }
  const int workers = static_cast<int>(std::min<int64_t>(threads, groups));
  // Scratch is allocated here, before the workers start, and kept by the calling thread: a
  // decode step calls this once per token, on buffers of the same size.
  static thread_local std::vector<Scratch> kept;
  std::vector<Scratch>& scratch = kept;  // the caller's: a worker naming `kept` would get its own
  if (scratch.size() < static_cast<size_t>(workers)) scratch.resize(workers);
  for (int t = 0; t < workers; ++t) scratch[t].reserve(group_size);
  run_threads(workers, [&](int t) {
    for (int64_t g = groups * t / workers, stop = groups * (t + 1) / workers; g < stop; ++g)
      small_group<D>(p, g * group_size, (g + 1) * group_size, scratch[t]);
  });
}

}  // namespace

uint32_t philox4x32_10_w0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  uint32_t out[4];
  const uint32_t counter[4] = {c0, c1, c2, c3}, key[2] = {k0, k1};
  philox4x32_10(counter, key, out);
  return out[0];
}

void philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

int default_threads() {
  // $ARMQUANT_NUM_THREADS, else the CPUs this process may run on.
  if (const char* env = std::getenv("ARMQUANT_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

const char* cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx512()) return "avx512";
  if (use_avx2()) return "avx2";
#endif
  return "portable";
}

}  // namespace armq

int armq::cpu_forward(armq_dtype dtype, const void* x, void* y, int64_t B, int64_t S, int64_t I, const void* mask,
                     armq_mask_type mask_type, const int64_t* positions, const armq_attrs* attrs, int num_threads,
                     const ParallelFor* parallel_for) {
  if (!attrs || B < 0 || S < 0 || I < 0 || (B * S * I != 0 && (!x || !y)) ||
      (mask_type != ARMQ_MASK_NONE && !mask && B * S != 0) || attrs->scope < 0 || attrs->scope > 2)
    return ARMQ_ERR_INVALID_ARGUMENT;
  if (I == 0 || B * S == 0) return ARMQ_OK;
  Problem p{x, y, B, S, I, mask, mask ? mask_type : ARMQ_MASK_NONE, positions, *attrs};
  const int threads = num_threads > 0 ? num_threads : default_threads();
  struct Lend {  // the pool for this call only, also when it throws
    explicit Lend(const ParallelFor* pool) { lent_pool = pool; }
    ~Lend() { lent_pool = nullptr; }
  } lend(parallel_for);
  try {
    switch (dtype) {
      case ARMQ_FLOAT32:
        forward<Float32>(p, threads);
        break;
      case ARMQ_FLOAT16:
        forward<Float16>(p, threads);
        break;
      case ARMQ_BFLOAT16:
        forward<BFloat16>(p, threads);
        break;
      default:
        return ARMQ_ERR_INVALID_ARGUMENT;
    }
  } catch (const std::bad_alloc&) {
    return ARMQ_ERR_OUT_OF_MEMORY;
  } catch (...) {
    return ARMQ_ERR_INTERNAL;
  }
  return ARMQ_OK;
}

extern "C" int armq_cpu_forward(armq_dtype dtype, const void* x, void* y, int64_t B, int64_t S, int64_t I,
                                const void* mask, armq_mask_type mask_type, const int64_t* positions,
                                const armq_attrs* attrs, int num_threads) {
  return armq::cpu_forward(dtype, x, y, B, S, I, mask, mask_type, positions, attrs, num_threads, nullptr);
}

extern "C" const char* armq_cpu_isa(void) { return armq::cpu_isa(); }
