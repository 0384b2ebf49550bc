"""The ARM operator (Activation Redistribution Module), reference implementation.

ARM comes from "Meaningless Tokens, Meaningful Gains: How Activation Shifts Enhance LLM
Reasoning" (Shi et al., arXiv 2510.01032). It moves the activations nearest zero outward to
random values of the same sign. `docs/arm-op-spec.md` defines the function exactly (its last
section pins what the paper's page leaves implicit); this file is its readable ground truth,
and the native kernels (`export/`) are tested bit for bit against it.

Everything is tensor arithmetic on the input's device: no `.item()`, no host round trip, so
the op can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

__all__ = ["ARMConfig", "PRESETS", "ARM", "arm", "arm_reference", "philox4x32_10", "uniform"]

SCOPES = ("tensor", "sequence", "token")
SHARES = ("mad", "fixed")
PERCENTILE_OF = ("signed", "abs")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _f32(value: float) -> float:
    """The float32 value nearest to `value`, as a Python float (what ONNX would store)."""
    return float(np.float32(value))


@dataclass(frozen=True)
class ARMConfig:
    """Attributes of one ARM op; defaults are the published Qwen2.5 settings."""

    c: float = 0.13
    p1: float = 99.5
    k: float = 1.0
    pmin: float = 0.02
    pmax: float = 0.25
    kappa: float = 1.4826
    share: str = "mad"
    percentile_of: str = "signed"
    scope: str = "sequence"
    seed: int = 0

    version = 1  # of the serialized form, not a field

    def __post_init__(self):
        for name in ("c", "p1", "k", "pmin", "pmax", "kappa"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ARM attribute {name}={value!r} must be a finite number")
        if not 0.0 <= self.p1 <= 100.0:
            raise ValueError(f"ARM attribute p1={self.p1} must lie in [0, 100] (it is a percentile)")
        if self.pmin < 0 or self.pmax > 1 or self.pmin > self.pmax:
            raise ValueError(
                f"ARM attributes pmin={self.pmin}, pmax={self.pmax} must satisfy 0 <= pmin <= pmax <= 1"
            )
        if self.c < 0 or self.k < 0 or self.kappa < 0:
            raise ValueError(f"ARM attributes c={self.c}, k={self.k}, kappa={self.kappa} must be >= 0")
        if self.share not in SHARES:
            raise ValueError(f"ARM attribute share={self.share!r} must be one of {SHARES}")
        if self.percentile_of not in PERCENTILE_OF:
            raise ValueError(f"ARM attribute percentile_of={self.percentile_of!r} must be one of {PERCENTILE_OF}")
        if self.scope not in SCOPES:
            raise ValueError(f"ARM attribute scope={self.scope!r} must be one of {SCOPES}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"ARM attribute seed={self.seed!r} must be an integer in [0, 2**63)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ARMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ARM attributes {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "ARMConfig":
        return dataclasses.replace(self, **changes)


# Published settings (paper Table 9 and its code). Gemma-3 uses p1 in 85..96.5; 90 is the middle.
PRESETS: dict[str, ARMConfig] = {
    "qwen2.5": ARMConfig(),
    "llama-3.1": ARMConfig(c=0.32, p1=90.0, pmin=0.2),
    "gemma-3": ARMConfig(c=0.25, p1=90.0, share="fixed", percentile_of="abs"),
}


# --- Philox4x32-10 on int64 tensors holding uint32 values --------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * m for uint32 a (int64 tensor) and constant m.

    Split m in 16-bit halves so that no int64 product overflows.
    """
    low_part = a * (m & 0xFFFF)  # < 2**48
    high_part = a * (m >> 16)  # < 2**48
    s = low_part + ((high_part & 0xFFFF) << 16)  # < 2**49
    return (high_part >> 16) + (s >> 32), s & _MASK32


def philox4x32_10(counter: tuple, key: tuple) -> tuple:
    """Philox4x32-10 (Random123 / cuRAND). Words are int64 tensors or Python ints holding uint32.

    Constant words stay Python ints: no host-to-device copies, so CUDA graph capture works.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0 = (k0 + _PHILOX_W[0]) & _MASK32
            k1 = (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform(channel: torch.Tensor, position: torch.Tensor, seed: int) -> torch.Tensor:
    """The spec's u in [0, 1) as float32, for broadcastable int64 channel and position tensors."""
    position = position.to(torch.int64)
    w0, _, _, _ = philox4x32_10(
        (channel.to(torch.int64), position & _MASK32, (position >> 32) & _MASK32, 0),
        (seed & _MASK32, seed >> 32),
    )
    return (w0 >> 8).to(torch.float32) * (2.0**-24)


# --- The operator ------------------------------------------------------------------------


def _check_inputs(x: torch.Tensor, mask: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"ARM input X must be float32, float16 or bfloat16; got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"ARM input X must have shape [B, S, I] or [S, I]; got {list(x.shape)}")
    token_shape = list(x.shape[:-1]) if x.dim() == 3 else [1, x.shape[0]]
    for name, t in (("mask", mask), ("positions", positions)):
        if t is None:
            continue
        if t.shape != torch.Size(token_shape) and not (x.dim() == 2 and list(t.shape) == token_shape[1:]):
            raise ValueError(f"ARM input {name} must have shape {token_shape} to match X {list(x.shape)}; got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"ARM input {name} is on {t.device} but X is on {x.device}")
    if mask is not None and mask.dtype not in (torch.bool, torch.int64, torch.int32):
        raise TypeError(f"ARM input mask must be bool or int64 (an attention mask); got {mask.dtype}")
    if positions is not None and positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ARM input positions must be int64 (position_ids); got {positions.dtype}")


def _order_statistic(values: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """values: [G, L] with invalid entries +inf; rank: [G] int64 -> [G] rank-th smallest."""
    return values.sort(dim=1).values.gather(1, rank.clamp(min=0)[:, None])[:, 0]


def arm_reference(
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    config: ARMConfig = ARMConfig(),
) -> torch.Tensor:
    """ARM exactly as the specification defines it. Same shape and dtype as `x`."""
    _check_inputs(x, mask, positions)
    dtype, shape = x.dtype, x.shape
    x3 = x if x.dim() == 3 else x.unsqueeze(0)  # [B, S, I]
    B, S, I = x3.shape
    device = x.device

    if mask is None:
        token_valid = torch.ones(B, S, dtype=torch.bool, device=device)
    else:
        token_valid = mask.reshape(B, S) != 0
    if positions is None:
        positions = torch.arange(S, device=device, dtype=torch.int64).expand(B, S)
    positions = positions.reshape(B, S).to(torch.int64)

    xf = x3.float()  # widening is exact
    valid = token_valid[:, :, None] & torch.isfinite(xf)  # [B, S, I]

    groups = {"tensor": 1, "sequence": B, "token": B * S}[config.scope]
    xg = xf.reshape(groups, -1)  # [G, L], flat index order kept
    vg = valid.reshape(groups, -1)
    L = xg.shape[1]
    inf = float("inf")

    n_valid = vg.sum(dim=1)  # N: [G] int64
    rank = (n_valid - 1).div(2, rounding_mode="floor")  # r = floor((N - 1) / 2)

    a = torch.where(vg, xg.abs(), inf)  # invalid -> +inf: sorts last
    a_sorted, order = a.sort(dim=1, stable=True)  # ties by flat index: step 7
    median = a_sorted.gather(1, rank.clamp(min=0)[:, None])  # [G, 1]
    deviation = torch.where(vg, (a - median).abs(), inf)
    mad = _order_statistic(deviation, rank)
    # Python-float operands of a float32 tensor op are applied as float32; these are exact float32 values.
    eps = (mad * _f32(config.kappa)) * _f32(config.c)  # each product rounded to float32

    n64 = n_valid.to(torch.float64)
    if config.share == "mad":
        near_zero = (a < eps[:, None]).sum(dim=1).to(torch.float64)
        frac = ((_f32(config.k) * near_zero) / n64).clamp(_f32(config.pmin), _f32(config.pmax))
    else:
        frac = torch.full_like(n64, min(max(_f32(config.c), 0.0), 1.0))
    n_moved = torch.round(frac * n64).clamp(min=1).to(torch.int64)
    n_moved = torch.where(n_valid > 0, torch.minimum(n_moved, n_valid), 0)

    selected_sorted = torch.arange(L, device=device)[None, :] < n_moved[:, None]
    selected = torch.zeros_like(vg).scatter_(1, order, selected_sorted)

    # Qp: the p1-th percentile, linear interpolation, in float64 then rounded to float32.
    pool = a_sorted if config.percentile_of == "abs" else torch.where(vg, xg, inf).sort(dim=1).values
    h = ((n64 - 1) * _f32(config.p1)) / 100.0
    lo = h.floor()
    lo_index = lo.to(torch.int64).clamp(min=0)
    hi_index = torch.minimum(lo_index + 1, (n_valid - 1).clamp(min=0))
    v_lo = pool.gather(1, lo_index[:, None])[:, 0].to(torch.float64)
    v_hi = pool.gather(1, hi_index[:, None])[:, 0].to(torch.float64)
    q_p = (v_lo + (h - lo) * (v_hi - v_lo)).to(torch.float32)
    m_neg = torch.where(vg, xg, inf).amin(dim=1).abs()

    positive = xg >= 0  # -0.0 counts as positive
    scale = torch.where(positive, q_p[:, None], m_neg[:, None])  # [G, L]
    sign = torch.where(positive, 1.0, -1.0)
    y = x3.reshape(groups, -1).clone()
    if device.type == "cpu":
        # Philox dominates the cost; on the CPU a data-dependent gather is free of device syncs,
        # so draw u only for the (at most pmax) selected elements.
        flat = selected.reshape(-1).nonzero()[:, 0]
        token, channel = flat // I, flat % I
        u = uniform(channel, positions.reshape(-1)[token], config.seed)
        y.view(-1)[flat] = (sign.view(-1)[flat] * (u * scale.view(-1)[flat])).to(dtype)
    else:
        channel = torch.arange(I, device=device, dtype=torch.int64)
        u = uniform(channel[None, None, :], positions[:, :, None], config.seed).reshape(groups, -1)
        y = torch.where(selected, (sign * (u * scale)).to(dtype), y)
    return y.reshape(shape)


# --- Registration as torch.ops.armquant.arm ------------------------------------------------

_BACKEND_ENV = "ARMQUANT_ARM_BACKEND"  # "auto" (default), "reference" or "native"


@torch.library.custom_op("armquant::arm", mutates_args=())
def _arm_op(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    c: float,
    p1: float,
    k: float,
    pmin: float,
    pmax: float,
    kappa: float,
    share: str,
    percentile_of: str,
    scope: str,
    seed: int,
) -> torch.Tensor:
    config = ARMConfig(c, p1, k, pmin, pmax, kappa, share, percentile_of, scope, seed)
    native = _native_kernel(x.device.type)
    if native is not None:
        return native(x, mask, positions, config)
    return arm_reference(x, mask, positions, config)


@_arm_op.register_fake
def _arm_op_fake(x, mask, positions, c, p1, k, pmin, pmax, kappa, share, percentile_of, scope, seed):
    _check_inputs(x, mask, positions)
    return torch.empty_like(x)


def _native_kernel(device_type: str):
    """The native kernel for this device, or None to use the reference (see _BACKEND_ENV)."""
    backend = os.environ.get(_BACKEND_ENV, "auto")
    if backend == "reference":
        return None
    try:
        from armquant import _native
    except ImportError:
        _native = None
    kernel = _native.kernel(device_type) if _native is not None else None
    if kernel is None and backend == "native":
        raise RuntimeError(
            f"{_BACKEND_ENV}=native but no native ARM kernel is built for {device_type}; "
            "reinstall with `pip install -e .` (needs a C++ compiler) or unset the variable"
        )
    return kernel


def arm(
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    config: ARMConfig = ARMConfig(),
) -> torch.Tensor:
    """ARM through `torch.ops.armquant.arm` (native kernel when built, else the reference)."""
    return torch.ops.armquant.arm(
        x, mask, positions, config.c, config.p1, config.k, config.pmin, config.pmax,
        config.kappa, config.share, config.percentile_of, config.scope, config.seed,
    )


class ARM(torch.nn.Module):
    """ARM as a module. `enabled=False` makes it the identity (for ARM on/off comparisons)."""

    def __init__(self, config: ARMConfig = ARMConfig()):
        super().__init__()
        self.config = config
        self.enabled = True

    def forward(self, x, mask=None, positions=None):
        # x: [B, S, I]; mask, positions: [B, S]
        if not self.enabled:
            return x
        return arm(x, mask, positions, self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items()) + ("" if self.enabled else ", disabled")
