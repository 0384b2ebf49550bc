"""A second, deliberately plain implementation of docs/arm-op-spec.md: NumPy and Python
integers, one group at a time, following the page step by step. Slow; for small test inputs."""

from __future__ import annotations

import math

import numpy as np

M32 = 0xFFFFFFFF


def philox(counter, key):
    c = list(counter)
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
    return tuple(c)


def u_of(channel: int, position: int, seed: int) -> np.float32:
    channel, p = int(channel), int(position) & 0xFFFFFFFFFFFFFFFF  # Python ints: no wraparound
    w = philox((channel, p & M32, p >> 32, 0), (seed & M32, seed >> 32))[0]
    return np.float32((w >> 8) * 2.0**-24)


def arm_spec(x, mask=None, positions=None, c=0.13, p1=99.5, k=1.0, pmin=0.02, pmax=0.25, kappa=1.4826,
             share="mad", percentile_of="signed", scope="sequence", seed=0, dtype=np.float32):
    """x: float array [B, S, I] holding values of `dtype` (already rounded). Returns float32 [B, S, I]
    of the output values (before the cast to dtype) and a bool array of the changed elements."""
    x = np.asarray(x, dtype=np.float32)
    B, S, I = x.shape
    mask = np.ones((B, S), bool) if mask is None else np.asarray(mask) != 0
    positions = np.broadcast_to(np.arange(S), (B, S)) if positions is None else np.asarray(positions)
    f32 = lambda v: np.float32(v)  # noqa: E731  float attributes are float32
    flat = x.reshape(-1)
    y = flat.copy()
    selected_all = np.zeros(flat.shape, bool)
    group_len = {"tensor": B * S * I, "sequence": S * I, "token": I}[scope]
    for start in range(0, flat.size, group_len):
        idx = np.arange(start, start + group_len)
        tok = idx // I
        valid = mask.reshape(-1)[tok] & np.isfinite(flat[idx])
        vidx = idx[valid]
        N = vidx.size
        if N == 0:
            continue
        xs = flat[vidx]
        a = np.abs(xs).astype(np.float32)
        r = (N - 1) // 2
        m = np.sort(a)[r]
        mad = np.sort(np.abs((a - m).astype(np.float32)))[r]
        eps = np.float32(np.float32(f32(kappa) * mad) * f32(c))
        if share == "mad":
            count = int(np.sum(a < eps))
            frac = min(max((float(f32(k)) * count) / N, float(f32(pmin))), float(f32(pmax)))
        else:
            frac = min(max(float(f32(c)), 0.0), 1.0)
        n = min(N, max(1, round(frac * N)))
        order = sorted(range(N), key=lambda j: (a[j], vidx[j]))[:n]
        pool = np.sort(a if percentile_of == "abs" else xs).astype(np.float64)
        h = ((N - 1) * float(f32(p1))) / 100.0
        lo = math.floor(h)
        hi = min(lo + 1, N - 1)
        qp = np.float32(pool[lo] + (h - lo) * (pool[hi] - pool[lo]))
        mneg = np.float32(abs(xs.min()))
        for j in order:
            e = vidx[j]
            b, s, i = e // (S * I), (e // I) % S, e % I
            u = u_of(i, int(positions[b, s]), seed)
            y[e] = np.float32(u * qp) if xs[j] >= 0 else -np.float32(u * mneg)
            selected_all[e] = True
    return y.reshape(B, S, I), selected_all.reshape(B, S, I)
