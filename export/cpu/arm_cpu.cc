// The ARM operator on the CPU, bit for bit as docs/arm-op-spec.md defines it.
//
// Per group (scope) we need order statistics of the valid values: the lower median m of |x|,
// the MAD (the same rank of |a - m|), the rank n-1 of |x| (the selection threshold) and two
// adjacent ranks of the percentile pool. Two strategies, both O(N):
//  - small groups (a token's channels): copy keys into scratch and radix-select them (11, 11, 10 bits);
//    groups are spread across threads.
//  - large groups (a whole sequence or tensor): radix select on the float bit patterns, which
//    order like the values. A 65536-bin histogram of the high 16 bits finds the bin holding a
//    rank, a second pass over that bin's low 16 bits finds the value (16-bit dtypes are exact
//    after the first level). Every pass reads x in place and is split across threads.
// Selection takes all a < t plus the first (n - count(a < t)) elements with a == t in flat
// order, where t is the rank n-1 value of a: the spec's (a, flat index) order.
//
// Bit exactness: build with -ffp-contract=off (no fused multiply-add), float math in float32,
// the share and percentile in double, exactly in the spec's evaluation order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <thread>
#include <vector>

#include "arm_internal.h"

#ifdef __linux__
#include <sched.h>
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

// Keys are unsigned integers that order like the values: akey like |x|, skey like x.
// A 32-bit key splits into a high and a low 16-bit half; a 16-bit key is its own high half.
struct Float32 {
  using Raw = uint32_t;
  static constexpr bool kExactHigh = false;
  static float value(Raw r) { return float_of(r); }
  static Raw raw_of(float v) { return bits_of(v); }
  static bool finite(Raw r) { return (r & 0x7f800000u) != 0x7f800000u; }
  static uint32_t akey(Raw r) { return r & 0x7fffffffu; }
  static uint32_t skey(Raw r) { return r ^ ((r & 0x80000000u) ? 0xffffffffu : 0x80000000u); }
  static float from_akey(uint32_t k) { return float_of(k); }
  static float from_skey(uint32_t k) { return float_of(k ^ ((k & 0x80000000u) ? 0x80000000u : 0xffffffffu)); }
};

// Order-preserving keys of a 16-bit sign-magnitude float, shared by float16 and bfloat16;
// Self supplies value(Raw).
template <class Self>
struct SignMagnitude16 {
  using Raw = uint16_t;
  static constexpr bool kExactHigh = true;
  static uint32_t akey(Raw r) { return r & 0x7fffu; }
  static uint32_t skey(Raw r) { return r ^ ((r & 0x8000u) ? 0xffffu : 0x8000u); }
  static float from_akey(uint32_t k) { return Self::value(static_cast<Raw>(k)); }
  static float from_skey(uint32_t k) { return Self::value(static_cast<Raw>(k ^ ((k & 0x8000u) ? 0x8000u : 0xffffu))); }
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

// Step 10 for one selected element at `channel` of a token at position `pos`.
template <class D>
inline typename D::Raw moved_value(const Problem& p, float x, int64_t channel, int64_t pos, float q_p, float m_neg) {
  const uint32_t w = philox4x32_10_w0(static_cast<uint32_t>(channel), static_cast<uint32_t>(pos),
                                      static_cast<uint32_t>(static_cast<uint64_t>(pos) >> 32), 0u,
                                      static_cast<uint32_t>(p.attrs.seed),
                                      static_cast<uint32_t>(p.attrs.seed >> 32));
  const float u = static_cast<float>(w >> 8) * 0x1p-24f;
  const float y = x >= 0.0f ? (u * q_p) : -(u * m_neg);
  return D::raw_of(y);
}

// The statistics of one group that the selection pass needs.
struct Stats {
  int64_t n_valid = 0;
  float threshold = 0;       // t: the rank n-1 value of a
  int64_t tie_quota = 0;     // elements with a == t still to take (in flat order)
  float q_p = 0, m_neg = 0;  // targets for positive and negative elements
};

// Selection and rewrite over flat elements [begin, end) of the tensor.
template <class D>
void select_and_move(const Problem& p, int64_t begin, int64_t end, const Stats& st, int64_t tie_quota) {
  using Raw = typename D::Raw;
  const Raw* x = static_cast<const Raw*>(p.x);
  Raw* y = static_cast<Raw*>(p.y);
  const float t = st.threshold;
  int64_t e = begin;
  while (e < end) {
    const int64_t token = e / p.I;
    const int64_t token_end = std::min(end, (token + 1) * p.I);
    if (!token_valid(p, token)) {
      e = token_end;
      continue;
    }
    for (; e < token_end; ++e) {
      const Raw r = x[e];
      if (!D::finite(r)) continue;
      const float v = D::value(r);
      const float a = std::fabs(v);
      if (a < t || (a == t && tie_quota > 0)) {
        if (!(a < t)) --tie_quota;
        y[e] = moved_value<D>(p, v, e - token * p.I, token_position(p, token), st.q_p, st.m_neg);
      }
    }
  }
}

template <class F>
void run_threads(int threads, F&& body) {
  if (threads <= 1) {
    body(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(body, t);
  body(0);
  for (auto& th : pool) th.join();
}

// ---- small groups: radix select on scratch copies of the keys -----------------------------

// Per-worker scratch, allocated before the workers start.
struct Scratch {
  std::vector<float> vals;
  std::vector<uint32_t> akeys, keys, tmp;
  void reserve(int64_t n) {
    vals.reserve(n);
    akeys.reserve(n);
    keys.reserve(n);
    tmp.reserve(n);
  }
};

// The rank-k (0-based) smallest of keys[0, n): 11, 11 and 10 bits at a time, keeping only
// the elements of the chosen bin between levels. keys is left as it is; tmp is scratch.
inline uint32_t radix_select(const uint32_t* keys, int64_t n, int64_t k, uint32_t* tmp) {
  static constexpr int kShift[3] = {21, 10, 0};
  static constexpr uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  uint32_t hist[2048];
  const uint32_t* src = keys;
  uint32_t result = 0;
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level];
    const uint32_t mask = kMask[level];
    std::memset(hist, 0, sizeof hist);
    for (int64_t i = 0; i < n; ++i) ++hist[(src[i] >> shift) & mask];
    uint32_t bin = 0;
    int64_t cum = 0;
    while (cum + static_cast<int64_t>(hist[bin]) <= k) cum += hist[bin++];
    k -= cum;
    result |= bin << shift;
    if (level == 2) break;
    if (hist[bin] == static_cast<uint32_t>(n)) continue;  // all in one bin: nothing to drop
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = src[i];
      tmp[kept] = key;  // written always, kept only when in the bin: no branch
      kept += ((key >> shift) & mask) == bin;
    }
    src = tmp;
    n = kept;
  }
  return result;
}

inline uint32_t signed_key(float v) {
  const uint32_t r = bits_of(v);
  return r ^ (static_cast<uint32_t>(static_cast<int32_t>(r) >> 31) | 0x80000000u);
}
inline float from_signed_key(uint32_t k) { return float_of(k ^ ((k & 0x80000000u) ? 0x80000000u : 0xffffffffu)); }

template <class D>
void small_group(const Problem& p, int64_t begin, int64_t end, Scratch& s) {
  using Raw = typename D::Raw;
  const Raw* x = static_cast<const Raw*>(p.x);
  std::memcpy(static_cast<Raw*>(p.y) + begin, x + begin, (end - begin) * sizeof(Raw));
  s.vals.clear();
  float x_min = INFINITY;
  for (int64_t token = begin / p.I; token * p.I < end; ++token) {
    if (!token_valid(p, token)) continue;
    for (int64_t e = token * p.I, stop = std::min(end, e + p.I); e < stop; ++e) {
      if (!D::finite(x[e])) continue;
      const float v = D::value(x[e]);
      s.vals.push_back(v);
      x_min = std::min(x_min, v);
    }
  }
  const int64_t N = static_cast<int64_t>(s.vals.size());
  if (N == 0) return;
  const int64_t rank = (N - 1) / 2;
  s.akeys.resize(N);
  s.keys.resize(N);
  s.tmp.resize(N);
  // Keys of non-negative floats order like the values.
  for (int64_t j = 0; j < N; ++j) s.akeys[j] = bits_of(std::fabs(s.vals[j]));
  const float m = float_of(radix_select(s.akeys.data(), N, rank, s.tmp.data()));

  Stats st;
  st.n_valid = N;
  st.m_neg = std::fabs(x_min);
  const PercentileRanks pr = percentile_ranks(p.attrs, N);
  float v_lo, v_hi;
  if (p.attrs.percentile_abs) {
    v_lo = float_of(radix_select(s.akeys.data(), N, pr.lo_index, s.tmp.data()));
    v_hi = pr.hi_index == pr.lo_index ? v_lo : float_of(radix_select(s.akeys.data(), N, pr.hi_index, s.tmp.data()));
  } else {
    for (int64_t j = 0; j < N; ++j) s.keys[j] = signed_key(s.vals[j]);
    v_lo = from_signed_key(radix_select(s.keys.data(), N, pr.lo_index, s.tmp.data()));
    v_hi = pr.hi_index == pr.lo_index ? v_lo : from_signed_key(radix_select(s.keys.data(), N, pr.hi_index, s.tmp.data()));
  }
  st.q_p = interpolate(pr, v_lo, v_hi);

  for (int64_t j = 0; j < N; ++j) s.keys[j] = bits_of(std::fabs(float_of(s.akeys[j]) - m));
  const float eps = epsilon(p.attrs, float_of(radix_select(s.keys.data(), N, rank, s.tmp.data())));
  int64_t near_zero = 0;
  for (int64_t j = 0; j < N; ++j) near_zero += float_of(s.akeys[j]) < eps;
  const int64_t n = moved_count(p.attrs, N, near_zero);
  st.threshold = float_of(radix_select(s.akeys.data(), N, n - 1, s.tmp.data()));
  int64_t below = 0;
  for (int64_t j = 0; j < N; ++j) below += float_of(s.akeys[j]) < st.threshold;
  st.tie_quota = n - below;
  select_and_move<D>(p, begin, end, st, st.tie_quota);
}

// ---- large groups: radix select with per-thread histograms ------------------------------

constexpr int kBins = 65536;
constexpr int kBlock = 16;  // elements tested together before the rare per-element work
constexpr int64_t kMaxCandidates = int64_t{1} << 21;  // elements kept in the threshold's bin

// Bin holding rank k of a histogram, and the rank left inside that bin.
inline uint32_t bin_of_rank(const uint64_t* hist, int bins, int64_t k, int64_t* rank_in_bin) {
  int64_t cum = 0;
  for (int b = 0; b < bins; ++b) {
    if (cum + static_cast<int64_t>(hist[b]) > k) {
      *rank_in_bin = k - cum;
      return static_cast<uint32_t>(b);
    }
    cum += static_cast<int64_t>(hist[b]);
  }
  *rank_in_bin = 0;
  return static_cast<uint32_t>(bins - 1);  // unreachable for k < total
}

// An element whose |x| falls in the threshold's bin: resolved after the selection pass.
struct Candidate {
  int64_t index;
  float value;
};

// One group too large for scratch copies. Passes over x (each split across threads, each
// thread always taking the same contiguous chunk, so per-thread counts line up across passes):
//   1. copy x to y; histogram of the raw high 16 bits (sign, exponent, top mantissa bits),
//      which gives both the |x| and the signed-x histograms; N; min x.
//   2. (float32) low 16 bits inside the bins of the median of |x| and of the percentile ranks.
//   3. histogram of the high half of d = |a - m|.   4. low half inside the MAD's bin, and the
//      |x| values that fall in the range of eps that this bin allows.
//   5. select: a below the threshold's bin moves at once; a inside it is kept as a candidate
//      (float32) and resolved afterwards, in flat order.
// 16-bit dtypes are exact after the first level, so passes 2 and the candidates vanish.
template <class D>
class LargeGroup {
 public:
  using Raw = typename D::Raw;

  LargeGroup(const Problem& p, int64_t begin, int64_t end, int threads)
      : p_(p), x_(static_cast<const Raw*>(p.x)), begin_(begin), end_(end), threads_(threads) {}

  void run() {
    using std::vector;
    const size_t T = static_cast<size_t>(threads_);
    // Pass 1: copy, and a histogram of every element's raw high half (no branch per element:
    // the bins of NaN and Inf are dropped afterwards).
    vector<uint32_t> raw_local(T * kBins);
    run_threads(threads_, [&](int t) {
      int64_t b, e;
      chunk(t, &b, &e);
      std::memcpy(static_cast<Raw*>(p_.y) + b, x_ + b, (e - b) * sizeof(Raw));
      uint32_t* h = &raw_local[t * static_cast<size_t>(kBins)];
      std::fill(h, h + kBins, 0u);
      for_ranges(b, e, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) ++h[raw_high(x_[i])];
      });
      for (uint32_t r = 0; r < static_cast<uint32_t>(kBins); ++r)
        if (!finite_bin(r)) h[r] = 0;
    });
    // |x| histogram (akey high, 32768 bins) and signed histogram (skey high, 65536 bins).
    vector<uint64_t> hist_a(kBins / 2, 0), hist_s(kBins, 0);
    for (size_t t = 0; t < T; ++t) {
      const uint32_t* h = &raw_local[t * kBins];
      for (uint32_t r = 0; r < static_cast<uint32_t>(kBins); ++r) {
        hist_a[r & 0x7fffu] += h[r];
        hist_s[r ^ ((r & 0x8000u) ? 0xffffu : 0x8000u)] += h[r];
      }
    }
    const int64_t N = std::accumulate(hist_a.begin(), hist_a.end(), int64_t{0});
    if (N == 0) return;
    const bool signed_pool = !p_.attrs.percentile_abs;
    const uint64_t* pool_hist = signed_pool ? hist_s.data() : hist_a.data();
    const int pool_bins = signed_pool ? kBins : kBins / 2;
    auto pool_value = [signed_pool](uint32_t k) { return signed_pool ? D::from_skey(k) : D::from_akey(k); };

    const int64_t rank = (N - 1) / 2;
    const PercentileRanks pr = percentile_ranks(p_.attrs, N);
    int64_t in_m, in_lo, in_hi, in_min, unused;
    const uint32_t bin_m = bin_of_rank(hist_a.data(), kBins / 2, rank, &in_m);
    const uint32_t bin_lo = bin_of_rank(pool_hist, pool_bins, pr.lo_index, &in_lo);
    const uint32_t bin_hi = bin_of_rank(pool_hist, pool_bins, pr.hi_index, &in_hi);
    const uint32_t bin_min = bin_of_rank(hist_s.data(), kBins, 0, &in_min);
    float m, v_lo, v_hi, x_min;
    if (D::kExactHigh) {
      m = D::from_akey(bin_m);
      v_lo = pool_value(bin_lo);
      v_hi = pool_value(bin_hi);
      x_min = D::from_skey(bin_min);
    } else {
      // Pass 2: low halves inside the bins of m, the percentile ranks and min x. Blocks
      // with none of them (nearly all) cost a few vector instructions.
      vector<uint32_t> local(4 * T * kBins, 0);
      run_threads(threads_, [&](int t) {
        int64_t b, e;
        chunk(t, &b, &e);
        uint32_t* h = &local[4 * t * static_cast<size_t>(kBins)];
        auto one = [&](Raw r) {
          const uint32_t ka = D::akey(r), kp = signed_pool ? skey_of(r) : ka, ks = skey_of(r);
          if (!D::finite(r)) return;
          if ((ka >> 16) == bin_m) ++h[ka & 0xffffu];
          if ((kp >> 16) == bin_lo) ++h[kBins + (kp & 0xffffu)];
          if ((kp >> 16) == bin_hi) ++h[2 * kBins + (kp & 0xffffu)];
          if ((ks >> 16) == bin_min) ++h[3 * kBins + (ks & 0xffffu)];
        };
        for_ranges(b, e, [&](int64_t lo, int64_t hi) {
          int64_t i = lo;
          for (; i + kBlock <= hi; i += kBlock) {
            uint32_t hit = 0;
            for (int j = 0; j < kBlock; ++j) {
              const uint32_t r = x_[i + j], ka = r & 0x7fffffffu, ks = skey_of(r), kp = signed_pool ? ks : ka;
              hit |= ((ka >> 16) == bin_m) | ((kp >> 16) == bin_lo) | ((kp >> 16) == bin_hi) | ((ks >> 16) == bin_min);
            }
            if (hit)
              for (int j = 0; j < kBlock; ++j) one(x_[i + j]);
          }
          for (; i < hi; ++i) one(x_[i]);
        });
      });
      vector<uint64_t> low(4 * kBins, 0);
      for (size_t t = 0; t < T; ++t)
        for (int j = 0; j < 4 * kBins; ++j) low[j] += local[4 * t * kBins + j];
      m = D::from_akey((bin_m << 16) | bin_of_rank(&low[0], kBins, in_m, &unused));
      v_lo = pool_value((bin_lo << 16) | bin_of_rank(&low[kBins], kBins, in_lo, &unused));
      v_hi = pool_value((bin_hi << 16) | bin_of_rank(&low[2 * kBins], kBins, in_hi, &unused));
      x_min = D::from_skey((bin_min << 16) | bin_of_rank(&low[3 * kBins], kBins, 0, &unused));
    }
    Stats st;
    st.n_valid = N;
    st.m_neg = std::fabs(x_min);
    st.q_p = interpolate(pr, v_lo, v_hi);

    // Pass 3: histogram of the high half of d = |a - m|. NaN and Inf give d = NaN or Inf,
    // whose bins (>= 0x7f80) are dropped; a finite d never lands there.
    vector<uint64_t> hist_d(kBins, 0);
    {
      vector<uint32_t> local(T * kBins, 0);
      run_threads(threads_, [&](int t) {
        int64_t b, e;
        chunk(t, &b, &e);
        uint32_t* h = &local[t * static_cast<size_t>(kBins)];
        for_ranges(b, e, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) ++h[bits_of(std::fabs(std::fabs(D::value(x_[i])) - m)) >> 16];
        });
      });
      for (size_t t = 0; t < T; ++t)
        for (int j = 0; j < 0x7f80; ++j) hist_d[j] += local[t * kBins + j];
    }
    int64_t in_d;
    const uint32_t bin_d = bin_of_rank(hist_d.data(), kBins, rank, &in_d);
    // Pass 4: the MAD, and count(a < eps) for every eps that MADs in this bin can give
    // (eps rises with the MAD): a < eps_lo counts at once, a in [eps_lo, eps_hi] is kept.
    const float eps_lo = epsilon(p_.attrs, float_of(bin_d << 16));
    const float eps_hi = epsilon(p_.attrs, float_of((bin_d << 16) | 0xffffu));
    const size_t keep_cap = static_cast<size_t>((end_ - begin_) / threads_ / 16 + 1024);
    vector<vector<float>> kept(T);
    for (auto& v : kept) v.reserve(keep_cap);
    vector<int64_t> below_lo(T, 0);
    vector<char> overflow(T, 0);
    vector<uint64_t> low_d(kBins, 0);
    {
      vector<uint32_t> local(T * kBins, 0);
      run_threads(threads_, [&](int t) {
        int64_t b, e;
        chunk(t, &b, &e);
        uint32_t* h = &local[t * static_cast<size_t>(kBins)];
        vector<float>& keep = kept[t];
        int64_t c = 0;  // NaN and Inf never compare below eps_lo
        bool full = false;
        auto one = [&](Raw r) {
          if (!D::finite(r)) return;
          const float a = std::fabs(D::value(r));
          const uint32_t k = bits_of(std::fabs(a - m));
          if ((k >> 16) == bin_d) ++h[k & 0xffffu];
          if (a >= eps_lo && a <= eps_hi) {
            if (keep.size() < keep_cap) keep.push_back(a);
            else full = true;
          }
        };
        for_ranges(b, e, [&](int64_t lo, int64_t hi) {
          int64_t i = lo;
          for (; i + kBlock <= hi; i += kBlock) {
            uint32_t hit = 0;
            int32_t below = 0;
            for (int j = 0; j < kBlock; ++j) {
              const float a = std::fabs(D::value(x_[i + j]));
              const uint32_t k = bits_of(std::fabs(a - m));
              below += a < eps_lo;
              hit |= ((k >> 16) == bin_d) | ((a >= eps_lo) & (a <= eps_hi));
            }
            c += below;
            if (hit)
              for (int j = 0; j < kBlock; ++j) one(x_[i + j]);
          }
          for (; i < hi; ++i) {
            c += std::fabs(D::value(x_[i])) < eps_lo;
            one(x_[i]);
          }
        });
        below_lo[t] = c;
        overflow[t] = full;
      });
      for (size_t t = 0; t < T; ++t)
        for (int j = 0; j < kBins; ++j) low_d[j] += local[t * kBins + j];
    }
    const float mad = float_of((bin_d << 16) | bin_of_rank(low_d.data(), kBins, in_d, &unused));
    const float eps = epsilon(p_.attrs, mad);
    int64_t near_zero = 0;
    if (std::find(overflow.begin(), overflow.end(), 1) == overflow.end()) {
      for (size_t t = 0; t < T; ++t) {
        near_zero += below_lo[t];
        for (float a : kept[t]) near_zero += a < eps;
      }
    } else {  // too many values near eps to keep (e.g. many equal values): count again
      vector<int64_t> below(T, 0);
      run_threads(threads_, [&](int t) {
        int64_t b, e, c = 0;
        chunk(t, &b, &e);
        for_ranges(b, e, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) c += std::fabs(D::value(x_[i])) < eps;
        });
        below[t] = c;
      });
      for (auto c : below) near_zero += c;
    }
    kept = vector<vector<float>>();

    // The threshold t: rank n-1 of a.
    const int64_t n = moved_count(p_.attrs, N, near_zero);
    int64_t in_t;
    const uint32_t bin_t = bin_of_rank(hist_a.data(), kBins / 2, n - 1, &in_t);
    int64_t below_bin = 0;
    for (uint32_t b = 0; b < bin_t; ++b) below_bin += static_cast<int64_t>(hist_a[b]);
    vector<int64_t> in_bin(T);  // per thread: elements with a in the threshold's bin
    for (size_t t = 0; t < T; ++t)
      in_bin[t] = raw_local[t * kBins + bin_t] + raw_local[t * kBins + (bin_t | 0x8000u)];

    if (D::kExactHigh) {
      // The bin is the value: move a < t, and the first ties in flat order.
      st.threshold = D::from_akey(bin_t);
      st.tie_quota = n - below_bin;
      const vector<int64_t> quota = split_quota(in_bin, st.tie_quota);
      run_threads(threads_, [&](int t) {
        int64_t b, e;
        chunk(t, &b, &e);
        select_and_move<D>(p_, b, e, st, quota[t]);
      });
      return;
    }
    const int64_t in_bin_total = std::accumulate(in_bin.begin(), in_bin.end(), int64_t{0});
    if (in_bin_total > kMaxCandidates) {
      // Many equal values: find t with one more histogram pass instead of keeping them.
      vector<uint32_t> local(T * kBins, 0);
      run_threads(threads_, [&](int t) {
        int64_t b, e;
        chunk(t, &b, &e);
        uint32_t* h = &local[t * static_cast<size_t>(kBins)];
        for_valid(b, e, [&](int64_t, Raw r) {
          const uint32_t k = D::akey(r);
          if ((k >> 16) == bin_t) ++h[k & 0xffffu];
        });
      });
      vector<uint64_t> low_t(kBins, 0);
      for (size_t t = 0; t < T; ++t)
        for (int j = 0; j < kBins; ++j) low_t[j] += local[t * kBins + j];
      const uint32_t low = bin_of_rank(low_t.data(), kBins, in_t, &unused);
      st.threshold = D::from_akey((bin_t << 16) | low);
      int64_t below = below_bin;
      for (uint32_t j = 0; j < low; ++j) below += static_cast<int64_t>(low_t[j]);
      vector<int64_t> ties(T);
      for (size_t t = 0; t < T; ++t) ties[t] = local[t * kBins + low];
      const vector<int64_t> quota = split_quota(ties, n - below);
      run_threads(threads_, [&](int t) {
        int64_t b, e;
        chunk(t, &b, &e);
        select_and_move<D>(p_, b, e, st, quota[t]);
      });
      return;
    }
    // Pass 5 (float32): move everything below the threshold's bin, keep the bin's elements.
    vector<vector<Candidate>> cands(T);
    for (size_t t = 0; t < T; ++t) cands[t].reserve(in_bin[t]);
    run_threads(threads_, [&](int t) {
      int64_t b, e;
      chunk(t, &b, &e);
      Raw* y = static_cast<Raw*>(p_.y);
      vector<Candidate>& mine = cands[t];
      // NaN and Inf sit above every finite bin: no separate check.
      for_ranges(b, e, [&](int64_t lo, int64_t hi) {
        const int64_t token = lo / p_.I, base = token * p_.I, pos = token_position(p_, token);
        for (int64_t i = lo; i < hi; ++i) {
          const Raw r = x_[i];
          const uint32_t hb = D::akey(r) >> 16;
          if (hb > bin_t) continue;
          if (hb < bin_t) y[i] = moved_value<D>(p_, D::value(r), i - base, pos, st.q_p, st.m_neg);
          else mine.push_back({i, D::value(r)});
        }
      });
    });
    // The threshold inside its bin, then the candidates in flat order.
    vector<float> values;
    values.reserve(static_cast<size_t>(in_bin_total));
    for (auto& c : cands)
      for (auto& cand : c) values.push_back(std::fabs(cand.value));
    std::nth_element(values.begin(), values.begin() + in_t, values.end());
    st.threshold = values[in_t];
    int64_t below = below_bin;
    for (float a : values) below += a < st.threshold;
    vector<int64_t> ties(T, 0);
    for (size_t t = 0; t < T; ++t)
      for (auto& cand : cands[t]) ties[t] += std::fabs(cand.value) == st.threshold;
    const vector<int64_t> quota = split_quota(ties, n - below);
    run_threads(threads_, [&](int t) {
      Raw* y = static_cast<Raw*>(p_.y);
      int64_t left = quota[t];
      for (auto& cand : cands[t]) {
        const float a = std::fabs(cand.value);
        if (a < st.threshold || (a == st.threshold && left-- > 0)) {
          const int64_t token = cand.index / p_.I;
          y[cand.index] = moved_value<D>(p_, cand.value, cand.index - token * p_.I, token_position(p_, token), st.q_p,
                                         st.m_neg);
        }
      }
    });
  }

 private:
  // Sign, exponent and top mantissa bits of the raw pattern (the whole of a 16-bit one).
  static uint32_t raw_high(Raw r) { return D::kExactHigh ? r : static_cast<uint32_t>(r) >> 16; }
  static bool finite_bin(uint32_t high) { return D::finite(static_cast<Raw>(D::kExactHigh ? high : high << 16)); }
  // skey without a branch (float32 only: the 16-bit dtypes never need it per element).
  static uint32_t skey_of(uint32_t r) { return r ^ (static_cast<uint32_t>(static_cast<int32_t>(r) >> 31) | 0x80000000u); }

  // Elements of valid tokens in [b, e), as contiguous ranges.
  template <class F>
  void for_ranges(int64_t b, int64_t e, F&& f) const {
    while (b < e) {
      const int64_t token = b / p_.I;
      const int64_t token_end = std::min(e, (token + 1) * p_.I);
      if (token_valid(p_, token)) f(b, token_end);
      b = token_end;
    }
  }

  // Ties are taken in flat order: the earliest chunks take theirs first.
  static std::vector<int64_t> split_quota(const std::vector<int64_t>& ties, int64_t quota) {
    std::vector<int64_t> out(ties.size());
    for (size_t t = 0; t < ties.size(); ++t) {
      out[t] = std::min(ties[t], quota);
      quota -= out[t];
    }
    return out;
  }

  void chunk(int t, int64_t* b, int64_t* e) const {
    const int64_t L = end_ - begin_;
    *b = begin_ + L * t / threads_;
    *e = begin_ + L * (t + 1) / threads_;
  }

  template <class F>
  void for_valid(int64_t b, int64_t e, F&& f) const {
    while (b < e) {
      const int64_t token = b / p_.I;
      const int64_t token_end = std::min(e, (token + 1) * p_.I);
      if (token_valid(p_, token)) {
        for (int64_t i = b; i < token_end; ++i) {
          const Raw r = x_[i];
          if (D::finite(r)) f(i, r);
        }
      }
      b = token_end;
    }
  }

  const Problem& p_;
  const Raw* x_;
  int64_t begin_, end_;
  int threads_;
};

template <class D>
void forward(const Problem& p, int threads) {
  const int64_t total = p.B * p.S * p.I;
  const int64_t group_size = p.attrs.scope == ARMQ_SCOPE_TENSOR ? total
                             : p.attrs.scope == ARMQ_SCOPE_SEQUENCE ? p.S * p.I
                                                                     : p.I;
  if (total == 0) return;
  const int64_t groups = total / group_size;
  // Threads only pay off on enough work; a decode step stays on the calling thread.
  const int64_t useful = std::max<int64_t>(1, total / (1 << 15));
  threads = static_cast<int>(std::min<int64_t>(threads, useful));
  constexpr int64_t kLargeGroup = 1 << 17;
  if (group_size >= kLargeGroup) {
    for (int64_t g = 0; g < groups; ++g) LargeGroup<D>(p, g * group_size, (g + 1) * group_size, threads).run();
    return;
  }
  const int workers = static_cast<int>(std::min<int64_t>(threads, groups));
  // Scratch is allocated here, not in the workers, so that running out of memory is an error
  // code rather than an exception escaping a thread.
  std::vector<Scratch> scratch(workers);
  for (auto& s : scratch) s.reserve(group_size);
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

}  // namespace armq

extern "C" int armq_cpu_forward(armq_dtype dtype, const void* x, void* y, int64_t B, int64_t S, int64_t I,
                                const void* mask, armq_mask_type mask_type, const int64_t* positions,
                                const armq_attrs* attrs, int num_threads) {
  using namespace armq;
  if (!attrs || B < 0 || S < 0 || I < 0 || (B * S * I != 0 && (!x || !y)) ||
      (mask_type != ARMQ_MASK_NONE && !mask && B * S != 0) || attrs->scope < 0 || attrs->scope > 2)
    return ARMQ_ERR_INVALID_ARGUMENT;
  if (I == 0 || B * S == 0) return ARMQ_OK;
  Problem p{x, y, B, S, I, mask, mask ? mask_type : ARMQ_MASK_NONE, positions, *attrs};
  const int threads = num_threads > 0 ? num_threads : default_threads();
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
