// Host emulation of the CUDA kernel's algorithm (arm_cuda.cu), one group at a time and in
// sequence, on the same arithmetic (arm_cuda_core.cuh): the same keys, radix-select digit
// steps, histogram walks, formulas and tie rule. tests/test_arm_cuda_emulation.py builds it
// with a host compiler and checks it bit for bit against the reference, so the algorithm is
// tested on machines without a GPU. Not part of the library.
#include <stdint.h>

#include <vector>

#include "arm_cuda_core.cuh"

namespace armq {
namespace {

enum { METHOD_RADIX = 1, METHOD_HIST16 = 2 };

template <class Tr>
struct Emulation {
  typedef typename Tr::raw raw;
  const raw* x;
  raw* y;
  int64_t S, I, L;
  const void* mask;
  armq_mask_type mask_type;
  const int64_t* positions;
  armq_attrs at;

  bool valid(int64_t j) const {
    int64_t token = j / I;
    if (mask_type == ARMQ_MASK_BOOL && static_cast<const uint8_t*>(mask)[token] == 0) return false;
    if (mask_type == ARMQ_MASK_INT64 && static_cast<const int64_t*>(mask)[token] == 0) return false;
    return finite_f32(Tr::widen(x[j]));
  }

  uint32_t key(int kind, raw v, float m) const {
    if (kind == 0) return Tr::key_abs(v);
    if (kind == 1) return Tr::key_signed(v);
    return key_deviation(fabsf(Tr::widen(v)), m);
  }

  // The radix plan: digit passes over the group, as k_radix_hist + k_radix_select do.
  void radix(int64_t g, GroupState& s) {
    const int64_t begin = g * L, end = begin + L;
    const int pool = at.percentile_abs ? 0 : 1;
    uint32_t hist[3][256];
    u64 rank[3];
    auto pass = [&](int nslots, const int* kinds, int shift, bool first) {
      for (int q = 0; q < 3; ++q)
        for (int d = 0; d < 256; ++d) hist[q][d] = 0;
      uint32_t min_key = 0xFFFFFFFFu;
      for (int64_t j = begin; j < end; ++j) {
        if (!valid(j)) continue;
        for (int q = 0; q < nslots; ++q) {
          uint32_t k = key(kinds[q], x[j], s.m);
          if (prefix_matches(k, first ? 0u : s.prefix[q], shift)) ++hist[q][(k >> shift) & 255u];
        }
        if (first && Tr::key_signed(x[j]) < min_key) min_key = Tr::key_signed(x[j]);
      }
      if (first) {
        s.mneg_key = ~min_key;
        u64 N = 0;
        for (int d = 0; d < 256; ++d) N += hist[0][d];
        s.N = N;
        if (N == 0) return;
        Percentile p = percentile_ranks(N, at.p1);
        rank[0] = median_rank(N);
        rank[1] = p.lo;
        rank[2] = p.hi;
        for (int q = 0; q < 3; ++q) s.prefix[q] = 0;
      } else {
        for (int q = 0; q < 3; ++q) rank[q] = s.rank_rem[q];
      }
      for (int q = 0; q < nslots; ++q) {
        uint32_t bucket;
        uint32_t digit = select_digit(hist[q], 256, &rank[q], &bucket);
        s.prefix[q] |= digit << shift;
        s.rank_rem[q] = rank[q];
        s.bucket[q] = bucket;
      }
    };
    const int stats_kinds[3] = {0, pool, pool}, dev_kind[1] = {2}, abs_kind[1] = {0};
    for (int shift = Tr::KEY_BITS - 8; shift >= 0; shift -= 8) {
      pass(3, stats_kinds, shift, shift == Tr::KEY_BITS - 8);
      if (s.N == 0) {
        s.n = 0;
        return;
      }
    }
    Percentile p = percentile_ranks(s.N, at.p1);
    s.m = Tr::from_key_abs(s.prefix[0]);
    float v_lo = at.percentile_abs ? Tr::from_key_abs(s.prefix[1]) : Tr::from_key_signed(s.prefix[1]);
    float v_hi = at.percentile_abs ? Tr::from_key_abs(s.prefix[2]) : Tr::from_key_signed(s.prefix[2]);
    s.qp = percentile_value(v_lo, v_hi, p);
    s.mneg = fabsf(Tr::from_key_signed(~s.mneg_key));
    s.prefix[0] = 0;
    s.rank_rem[0] = median_rank(s.N);
    for (int shift = 24; shift >= 0; shift -= 8) pass(1, dev_kind, shift, false);
    s.mad = f32_from_bits(s.prefix[0]);
    s.eps = eps_value(s.mad, at);
    s.near_zero = 0;
    if (!at.share_fixed)
      for (int64_t j = begin; j < end; ++j)
        if (valid(j) && fabsf(Tr::widen(x[j])) < s.eps) ++s.near_zero;
    s.n = moved_count(s.N, s.near_zero, at);
    s.prefix[0] = 0;
    s.rank_rem[0] = s.n - 1;
    for (int shift = Tr::KEY_BITS - 8; shift >= 0; shift -= 8) pass(1, abs_kind, shift, false);
    s.t_key = s.prefix[0];
    s.need = s.rank_rem[0] + 1;
    s.ties = s.bucket[0];
  }

  // The hist16 plan: everything from one 65536-bin histogram of raw bits, as k_analyze16 does.
  void hist16(int64_t g, GroupState& s) {
    std::vector<uint32_t> H(65536, 0), W(32768), neg(32768), pos(32768);
    for (int64_t j = g * L; j < (g + 1) * L; ++j)
      if (valid(j)) ++H[(uint32_t)x[j]];
    u64 N = 0;
    for (int b = 0; b < 32768; ++b) {
      neg[b] = H[b + 32768];
      pos[b] = H[b];
      W[b] = neg[b] + pos[b];
      N += W[b];
    }
    s.N = N;
    if (N == 0) {
      s.n = 0;
      return;
    }
    auto select = [](const std::vector<uint32_t>& w, u64 rank, uint32_t* below) {
      u64 acc = 0;
      for (uint32_t b = 0; b < w.size(); ++b) {
        if (rank < acc + w[b]) {
          *below = (uint32_t)acc;
          return b;
        }
        acc += w[b];
      }
      *below = (uint32_t)acc;
      return (uint32_t)w.size();  // unreachable
    };
    uint32_t below = 0;
    const u64 r = median_rank(N);
    s.m = Tr::from_key_abs(select(W, r, &below));
    uint32_t prefix = 0;
    u64 rank = r;
    for (int shift = 24; shift >= 0; shift -= 8) {
      uint32_t dh[256] = {0}, bucket;
      for (int b = 0; b < 32768; ++b) {
        if (!W[b]) continue;
        uint32_t k = key_deviation(Tr::from_key_abs(b), s.m);
        if (prefix_matches(k, prefix, shift)) dh[(k >> shift) & 255u] += W[b];
      }
      prefix |= select_digit(dh, 256, &rank, &bucket) << shift;
    }
    s.mad = f32_from_bits(prefix);
    s.eps = eps_value(s.mad, at);
    s.near_zero = 0;
    if (!at.share_fixed)
      for (int b = 0; b < 32768; ++b)
        if (Tr::from_key_abs(b) < s.eps) s.near_zero += W[b];
    s.n = moved_count(N, s.near_zero, at);
    s.t_key = select(W, s.n - 1, &below);
    s.need = s.n - below;
    s.ties = W[s.t_key];
    u64 n_neg = 0;
    for (int b = 0; b < 32768; ++b) n_neg += neg[b];
    auto signed_value = [&](u64 k) {
      if (k < n_neg) return Tr::widen((raw)(select(neg, n_neg - 1 - k, &below) | 0x8000u));
      return Tr::widen((raw)select(pos, k - n_neg, &below));
    };
    Percentile p = percentile_ranks(N, at.p1);
    s.mneg = fabsf(signed_value(0));
    if (at.percentile_abs)
      s.qp = percentile_value(Tr::from_key_abs(select(W, p.lo, &below)),
                              Tr::from_key_abs(select(W, p.hi, &below)), p);
    else
      s.qp = percentile_value(signed_value(p.lo), signed_value(p.hi), p);
  }

  // The output pass: below the threshold, plus the first `need` ties in flat-index order.
  void output(int64_t g, const GroupState& s) {
    u64 tie_rank = 0;
    for (int64_t j = g * L; j < (g + 1) * L; ++j) {
      y[j] = x[j];
      if (!s.n || !valid(j)) continue;
      uint32_t k = Tr::key_abs(x[j]);
      bool take = k < s.t_key;
      if (k == s.t_key) take = tie_rank++ < s.need;
      if (!take) continue;
      int64_t token = j / I, channel = j - token * I;
      int64_t position = positions ? positions[token] : token % S;
      float u = uniform((uint32_t)channel, position, at.seed);
      y[j] = Tr::narrow(moved_value(Tr::widen(x[j]), u, s.qp, s.mneg));
    }
  }
};

template <class Tr>
int emulate(int method, const void* x, void* y, int64_t B, int64_t S, int64_t I, const void* mask,
            armq_mask_type mask_type, const int64_t* positions, const armq_attrs& at) {
  int64_t G = at.scope == ARMQ_SCOPE_TENSOR ? 1 : at.scope == ARMQ_SCOPE_SEQUENCE ? B : B * S;
  Emulation<Tr> e{static_cast<const typename Tr::raw*>(x), static_cast<typename Tr::raw*>(y), S, I,
                  B * S * I / G, mask, mask ? mask_type : ARMQ_MASK_NONE, positions, at};
  for (int64_t g = 0; g < G; ++g) {
    GroupState s = {};
    if (method == METHOD_HIST16) {
      if (Tr::KEY_BITS != 16) return 1;
      e.hist16(g, s);
    } else {
      e.radix(g, s);
    }
    e.output(g, s);
  }
  return 0;
}

}  // namespace
}  // namespace armq

extern "C" int armq_emulate_forward(int method, armq_dtype dtype, const void* x, void* y, int64_t B,
                                    int64_t S, int64_t I, const void* mask, armq_mask_type mask_type,
                                    const int64_t* positions, const armq_attrs* attrs) {
  if (B <= 0 || S <= 0 || I <= 0) return 0;
  switch (dtype) {
    case ARMQ_FLOAT32:
      return armq::emulate<armq::F32>(method, x, y, B, S, I, mask, mask_type, positions, *attrs);
    case ARMQ_FLOAT16:
      return armq::emulate<armq::F16>(method, x, y, B, S, I, mask, mask_type, positions, *attrs);
    case ARMQ_BFLOAT16:
      return armq::emulate<armq::BF16>(method, x, y, B, S, I, mask, mask_type, positions, *attrs);
  }
  return 1;
}
