// The arithmetic of the ARM op (docs/arm-op-spec.md) shared by the CUDA kernels and the host
// (the CPU simulator of tests/test_arm_cuda_sim.py builds it there): dtype keys, Philox, the
// per-group formulas and the radix-select digit step. Everything here is __host__ __device__ and rounds
// each float operation once (explicit _rn intrinsics on the device), so no FMA contraction can
// make the GPU differ from the reference.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../include/arm_kernel.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ARMQ_HD __host__ __device__ __forceinline__
#else
#define ARMQ_HD inline
#endif

namespace armq {

typedef unsigned long long u64;

ARMQ_HD float f32_from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
#endif
}

ARMQ_HD uint32_t bits_from_f32(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
#endif
}

ARMQ_HD bool finite_f32(float f) { return (bits_from_f32(f) & 0x7F800000u) != 0x7F800000u; }

// One rounding per operation, as the reference's separate tensor ops do.
#if defined(__CUDA_ARCH__)
ARMQ_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
ARMQ_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
ARMQ_HD double dadd(double a, double b) { return __dadd_rn(a, b); }
ARMQ_HD double dsub(double a, double b) { return __dsub_rn(a, b); }
ARMQ_HD double dmul(double a, double b) { return __dmul_rn(a, b); }
ARMQ_HD double ddiv(double a, double b) { return __ddiv_rn(a, b); }
ARMQ_HD float to_f32(double a) { return __double2float_rn(a); }
#else
ARMQ_HD float mul_rn(float a, float b) { return a * b; }
ARMQ_HD float sub_rn(float a, float b) { return a - b; }
ARMQ_HD double dadd(double a, double b) { return a + b; }
ARMQ_HD double dsub(double a, double b) { return a - b; }
ARMQ_HD double dmul(double a, double b) { return a * b; }
ARMQ_HD double ddiv(double a, double b) { return a / b; }
ARMQ_HD float to_f32(double a) { return (float)a; }
#endif

// --- dtypes: raw bit patterns, widening, and order-preserving uint32 sort keys ---------------
// key_abs orders |x| (the bit pattern of a non-negative float is already ordered);
// key_signed orders x. 16-bit dtypes use 16-bit keys: widening to float32 keeps the order.

ARMQ_HD float half_bits_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    float v = (float)man * 5.9604644775390625e-08f;
    return f32_from_bits(sign | bits_from_f32(v));
  }
  if (exp == 31) return f32_from_bits(sign | 0x7F800000u | (man << 13));
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

ARMQ_HD uint16_t f32_to_half_bits(float f) {  // round to nearest even
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x = bits_from_f32(f), sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
  if (x >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                    // below 2^-14: subnormal or zero
    float scaled = f32_from_bits(x) * 16777216.0f;          // exact: times 2^24
    return (uint16_t)(sign | (uint32_t)nearbyintf(scaled));
  }
  x = x + 0xFFFu + ((x >> 13) & 1u) - (112u << 23);
  return (uint16_t)(sign | (x >> 13));
#endif
}

ARMQ_HD uint16_t f32_to_bf16_bits(float f) {  // round to nearest even; f is finite here
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t x = bits_from_f32(f);
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
#endif
}

struct F32 {
  typedef uint32_t raw;
  enum { KEY_BITS = 32, VEC = 4 };
  static ARMQ_HD float widen(raw r) { return f32_from_bits(r); }
  static ARMQ_HD raw narrow(float f) { return bits_from_f32(f); }
  static ARMQ_HD uint32_t key_abs(raw r) { return r & 0x7FFFFFFFu; }
  static ARMQ_HD uint32_t key_signed(raw r) { return (r & 0x80000000u) ? ~r : (r | 0x80000000u); }
  static ARMQ_HD float from_key_abs(uint32_t k) { return f32_from_bits(k); }
  static ARMQ_HD float from_key_signed(uint32_t k) {
    return f32_from_bits((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
  }
};

template <class Derived>
struct Bits16 {
  typedef uint16_t raw;
  enum { KEY_BITS = 16, VEC = 8 };
  static ARMQ_HD uint32_t key_abs(raw r) { return r & 0x7FFFu; }
  static ARMQ_HD uint32_t key_signed(raw r) { return (r & 0x8000u) ? (~r & 0xFFFFu) : (r | 0x8000u); }
  static ARMQ_HD raw raw_from_key_signed(uint32_t k) {
    return (raw)((k & 0x8000u) ? (k & 0x7FFFu) : (~k & 0xFFFFu));
  }
  static ARMQ_HD float from_key_abs(uint32_t k) { return Derived::widen((raw)k); }
  static ARMQ_HD float from_key_signed(uint32_t k) { return Derived::widen(raw_from_key_signed(k)); }
};

struct BF16 : Bits16<BF16> {
  static ARMQ_HD float widen(raw r) { return f32_from_bits((uint32_t)r << 16); }
  static ARMQ_HD raw narrow(float f) { return f32_to_bf16_bits(f); }
};

struct F16 : Bits16<F16> {
  static ARMQ_HD float widen(raw r) { return half_bits_to_f32(r); }
  static ARMQ_HD raw narrow(float f) { return f32_to_half_bits(f); }
};

// Key of |a - m| (the MAD step): a non-negative float32, so its bits are ordered.
ARMQ_HD uint32_t key_deviation(float a, float m) { return bits_from_f32(fabsf(sub_rn(a, m))); }

// --- Philox4x32-10 (Random123 / cuRAND round function) and the spec's uniform u -------------

ARMQ_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

ARMQ_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0 = mulhi32(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    uint32_t hi1 = mulhi32(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// u = (w0 >> 8) * 2^-24: exact in float32, in [0, 1).
ARMQ_HD float uniform(uint32_t channel, int64_t position, uint64_t seed) {
  uint64_t p = (uint64_t)position;
  uint32_t c[4] = {channel, (uint32_t)p, (uint32_t)(p >> 32), 0u};
  philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
  return (float)(c[0] >> 8) * 5.9604644775390625e-08f;
}

// --- Per-group formulas (spec steps 2 to 10) --------------------------------------------------

// The statistics of one group; lives in the device workspace between kernels.
struct GroupState {
  u64 N;            // valid elements
  u64 n;            // elements to move (0 when N == 0)
  u64 near_zero;    // count(a < eps)
  u64 need;         // elements with a == t to take, in flat-index order
  u64 ties;         // count(a == t)
  u64 rank_rem[3];  // radix select: rank left inside the current bucket, per query slot
  uint32_t prefix[3];  // radix select: key bits decided so far, per query slot
  uint32_t bucket[3];  // radix select: size of the bucket chosen last, per query slot
  uint32_t mneg_key;   // radix plan: ~(smallest key_signed), so atomicMax from zero finds it
  uint32_t t_key;      // key_abs of the threshold t
  float m, mad, eps, qp, mneg;
};

struct Percentile {
  u64 lo, hi;    // ranks of v_lo and v_hi
  double h, fl;  // h and floor(h)
};

ARMQ_HD u64 median_rank(u64 N) { return (N - 1) / 2; }  // N >= 1

ARMQ_HD Percentile percentile_ranks(u64 N, float p1) {  // N >= 1
  Percentile p;
  p.h = ddiv(dmul((double)N - 1.0, (double)p1), 100.0);
  p.fl = floor(p.h);
  p.lo = p.fl > 0.0 ? (u64)p.fl : 0;
  p.hi = p.lo + 1 < N - 1 ? p.lo + 1 : N - 1;
  return p;
}

// Qp = v_lo + (h - lo) * (v_hi - v_lo) in float64, rounded to float32.
ARMQ_HD float percentile_value(float v_lo, float v_hi, const Percentile& p) {
  double lo = v_lo, hi = v_hi;
  return to_f32(dadd(lo, dmul(dsub(p.h, p.fl), dsub(hi, lo))));
}

ARMQ_HD float eps_value(float mad, const armq_attrs& at) { return mul_rn(mul_rn(at.kappa, mad), at.c); }

// n = min(N, max(1, round_half_even(frac * N))), frac in float64 (spec steps 5 and 6).
ARMQ_HD u64 moved_count(u64 N, u64 near_zero, const armq_attrs& at) {
  double n64 = (double)N, frac;
  if (at.share_fixed) {
    frac = fmin(fmax((double)at.c, 0.0), 1.0);
  } else {
    frac = ddiv(dmul((double)at.k, (double)near_zero), n64);
    frac = fmin(fmax(frac, (double)at.pmin), (double)at.pmax);
  }
  double r = rint(dmul(frac, n64));
  u64 n = r < 1.0 ? 1 : (u64)r;
  return n < N ? n : N;
}

// A selected element's new value: sign * (u * T), one float32 product (spec step 10).
ARMQ_HD float moved_value(float x, float u, float qp, float mneg) {
  return x >= 0.0f ? mul_rn(u, qp) : -mul_rn(u, mneg);
}

// Radix-select step: the digit whose bucket holds the rank-th smallest key, given a histogram
// of the current digit over the keys that match the prefix chosen so far. `rank` becomes the
// rank inside that bucket; `below` the count in lower buckets.
ARMQ_HD uint32_t select_digit(const uint32_t* hist, int nbins, u64* rank, uint32_t* bucket) {
  for (int d = 0; d < nbins; ++d) {
    if (*rank < hist[d]) {
      *bucket = hist[d];
      return (uint32_t)d;
    }
    *rank -= hist[d];
  }
  *bucket = 0;
  return (uint32_t)(nbins - 1);  // unreachable when rank < total
}

// Does a key match the bits already selected above `shift + 8`?
ARMQ_HD bool prefix_matches(uint32_t key, uint32_t prefix, int shift) {
  return shift + 8 >= 32 || ((key ^ prefix) >> (shift + 8)) == 0;
}

}  // namespace armq
