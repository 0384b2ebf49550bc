"""Quantize ARM models: schemes, packed modules, checkpoints.

    armquant.quantize(model, W4A16(group_size=128, method="gptq"), data=windows)   # in place

A scheme is a small frozen config; a registry maps its type to the function that applies it,
so a new scheme is one config plus one handler. Every linear layer inside the decoder layers is
replaced by a quantized module holding plain integer buffers (packed INT4 two per byte, INT8,
or bitsandbytes' NF4/FP4/LLM.int8 layouts) and a one-line forward. Embeddings, the LM head and
norms stay in floating point, and so does ARM: it acts on the gate activation, between linears.

Run time is real low precision: INT8 weight-only uses `torch._weight_int8pack_mm` for short
inputs (else dequantizes on the fly), W8A8 multiplies int8 by int8 into int32 (`torch._int_mm` on
CUDA; exact float32 GEMMs over short column chunks on CPU, where `_int_mm` is a slow loop), INT4
dequantizes its packed weight on the fly, and the
bitsandbytes schemes call bitsandbytes' own kernels (CPU or CUDA). `fake_quantize` gives the
same rounding in floating point (simulation), for accuracy studies only.

A checkpoint is `model.safetensors` (packed integers and scales), `config.json`, the tokenizer,
`arm_config.json`, and `quantization_config.json` (scheme, format version, module list, sha256).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from armquant._io import atomic_dir
from armquant.cli import positive_int

__all__ = [
    "W8A16", "W4A16", "W8A8", "BnB", "PerChannel", "PerGroup", "PerToken", "PerTensor", "SCHEMES",
    "quantize", "fake_quantize", "save_quantized", "load_quantized", "scheme_from_dict", "scheme_from_name",
    "pack_int4", "unpack_int4", "group_qparams", "quantize_codes", "observe_input_absmax",
]

log = logging.getLogger(__name__)

QUANT_CONFIG_FILE = "quantization_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


# --- Granularity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row) of a weight."""


@dataclass(frozen=True)
class PerGroup:
    """One scale (and zero) per `group_size` consecutive input columns of each row."""

    group_size: int


@dataclass(frozen=True)
class PerToken:
    """One activation scale per token, computed at run time (dynamic)."""


@dataclass(frozen=True)
class PerTensor:
    """One activation scale per linear input, fixed from calibration (static)."""


# --- Schemes ----------------------------------------------------------------------------------


class _Scheme:
    """Shared by the scheme configs: a name, a format version, a dict round trip."""

    name = ""
    version = 1

    def to_dict(self) -> dict:
        return {"scheme": self.name, "version": self.version, **dataclasses.asdict(self)}

    def describe(self) -> str:
        return self.name + "(" + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items()) + ")"


def _check_weight_method(scheme) -> None:
    """Validate method / act_order / damp of a weight-only scheme; act_order None -> on for GPTQ."""
    if scheme.method not in ("rtn", "gptq"):
        raise ValueError(f"method={scheme.method!r} must be 'rtn' or 'gptq'")
    if scheme.act_order and scheme.method != "gptq":
        raise ValueError("act_order=True only applies to method='gptq'")
    if scheme.act_order is None:
        object.__setattr__(scheme, "act_order", scheme.method == "gptq")
    if not 0.0 < scheme.damp < 1.0:
        raise ValueError(f"damp={scheme.damp} must lie in (0, 1) (a fraction of the Hessian's mean diagonal)")


@dataclass(frozen=True)
class W8A16(_Scheme):
    """INT8 weights, symmetric, one scale per output channel; activations stay in floating point.
    By round-to-nearest ("rtn") or GPTQ ("gptq", calibration data; act_order as in W4A16)."""

    method: str = "rtn"
    act_order: Optional[bool] = None
    damp: float = 0.01

    name = "w8a16"
    weight_granularity = PerChannel()

    def __post_init__(self):
        _check_weight_method(self)


@dataclass(frozen=True)
class W4A16(_Scheme):
    """INT4 weights per group of input columns, by round-to-nearest ("rtn") or GPTQ ("gptq").

    act_order (GPTQ only): quantize columns by decreasing Hessian diagonal and form the groups in
    that order (GPTQ's desc_act); the checkpoint then holds `g_idx`, each column's group. None
    means on for GPTQ: on SmolLM2-135M it more than doubles the share of RTN's perplexity gap
    that GPTQ closes (RESULTS.md).
    """

    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    act_order: Optional[bool] = None
    damp: float = 0.01

    name = "w4a16"

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} must be an integer >= 2 (32, 64 and 128 are usual)")
        if self.group_size % 2:
            raise ValueError(f"group_size={self.group_size} must be even: two 4-bit values share a byte")
        _check_weight_method(self)

    @property
    def weight_granularity(self) -> PerGroup:
        return PerGroup(self.group_size)


@dataclass(frozen=True)
class W8A8(_Scheme):
    """INT8 weights (per channel) and INT8 activations: per token at run time ("dynamic") or one
    scale per linear input from calibration ("static"); optional SmoothQuant with strength alpha."""

    activations: str = "dynamic"
    smoothquant_alpha: Optional[float] = None

    name = "w8a8"
    weight_granularity = PerChannel()

    def __post_init__(self):
        if self.activations not in ("dynamic", "static"):
            raise ValueError(f"activations={self.activations!r} must be 'dynamic' (per token) or 'static' (per tensor)")
        a = self.smoothquant_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise ValueError(f"smoothquant_alpha={a!r} must be None (off) or a number in [0, 1] (0.5 is usual)")

    @property
    def activation_granularity(self):
        return PerToken() if self.activations == "dynamic" else PerTensor()


@dataclass(frozen=True)
class BnB(_Scheme):
    """bitsandbytes: LLM.int8 ("int8", outliers above 6.0 kept in floating point), or 4-bit
    NF4/FP4 ("nf4", "fp4", blocks of 64 with an absmax each)."""

    kind: str = "nf4"

    name = "bnb"

    def __post_init__(self):
        if self.kind not in ("int8", "nf4", "fp4"):
            raise ValueError(f"bitsandbytes kind={self.kind!r} must be 'int8', 'nf4' or 'fp4'")


SCHEMES: dict[str, type] = {cls.name: cls for cls in (W8A16, W4A16, W8A8, BnB)}


def scheme_from_dict(data: dict):
    """Inverse of `scheme.to_dict()`."""
    data = dict(data)
    name = data.pop("scheme", None)
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; known: {sorted(SCHEMES)}")
    cls = SCHEMES[name]
    version = data.pop("version", None)
    if version != cls.version:
        raise ValueError(f"{name} scheme version {version!r} is not supported (expected {cls.version})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{name} scheme has no fields {unknown}; it takes {sorted(fields)}")
    return cls(**data)


# Short names for the command line and the comparison table.
NAMED = {
    "w8a16": W8A16(),
    "w8a16-gptq": W8A16(method="gptq"),
    "w4a16-g128-rtn": W4A16(group_size=128, method="rtn"),
    "w4a16-g128-gptq": W4A16(group_size=128, method="gptq"),
    "w4a16-g64-rtn": W4A16(group_size=64, method="rtn"),
    "w4a16-g64-gptq": W4A16(group_size=64, method="gptq"),
    "w8a8": W8A8(),
    "w8a8-sq": W8A8(smoothquant_alpha=0.5),
    "w8a8-static": W8A8(activations="static"),
    "w8a8-static-sq": W8A8(activations="static", smoothquant_alpha=0.5),
    "llm-int8": BnB("int8"),
    "nf4": BnB("nf4"),
    "fp4": BnB("fp4"),
}


def scheme_from_name(name: str):
    if name not in NAMED:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(NAMED)} (or build a config in Python)")
    return NAMED[name]


# --- Integer grids: pure functions ------------------------------------------------------------


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 codes [N, K] in [-127, 127], scale [N]) with weight ~ codes * scale."""
    scale = (weight.detach().abs().amax(dim=1).float() / 127.0).clamp(min=1e-12)
    codes = torch.round(weight.float() / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return codes, scale


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [N, g] on an unsigned grid [0, 2**bits - 1].

    Symmetric: zero fixed at 2**(bits-1), scale = 2 * max|w| / (2**bits - 1) (the GPTQ convention).
    Asymmetric: the grid spans [min(w, 0), max(w, 0)]. Scales are rounded to float16 here, as they
    are stored, so that every user of the grid rounds against the same numbers.
    """
    maxq = 2**bits - 1
    w = w.float()
    if symmetric:
        scale = 2.0 * w.abs().amax(dim=1) / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round w [N] (or [N, g] with scale/zero [N, 1]) to grid codes, as floats in [0, 2**bits - 1]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def padded_width(in_features: int, group_size: int) -> int:
    """in_features rounded up to whole groups. A width that groups do not divide (SmolLM2's 576
    with groups of 128) is padded with zero columns: the last group is partial, and since every
    grid holds 0 exactly, the padding changes neither that group's scale nor any result."""
    return -(-in_features // group_size) * group_size


def pad_columns(w: torch.Tensor, width: int) -> torch.Tensor:
    return w if w.shape[-1] == width else F.pad(w, (0, width - w.shape[-1]))


def int4_groupwise(weight: torch.Tensor, group_size: int, symmetric: bool):
    """Round-to-nearest INT4: weight [N, K] -> (codes uint8 [N, Kp], scale [N, G], zero [N, G]),
    with Kp = padded_width(K, group_size) = G * group_size."""
    n = weight.shape[0]
    w = pad_columns(weight.detach().float(), padded_width(weight.shape[1], group_size))
    k = w.shape[1]
    w = w.reshape(n * (k // group_size), group_size)
    scale, zero = group_qparams(w, 4, symmetric)
    codes = quantize_codes(w, scale.unsqueeze(1), zero.unsqueeze(1), 4)
    return codes.to(torch.uint8).reshape(n, k), scale.reshape(n, -1), zero.reshape(n, -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15], K even -> bytes [N, K // 2]; column 2j in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns; got {codes.shape[-1]}")
    if codes.dtype != torch.uint8 or int(codes.max()) > 15:
        raise ValueError("pack_int4 takes uint8 codes in [0, 15]")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: bytes [N, K // 2] -> uint8 codes [N, K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_int4(packed, scale, zero, dtype=torch.float32, in_features: Optional[int] = None,
                    g_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """packed [N, Kp/2], scale/zero [N, G] -> weight [N, in_features] (padding columns dropped).
    g_idx [Kp]: the group of each column (GPTQ act-order); None: groups of consecutive columns."""
    codes = unpack_int4(packed)
    n, k = codes.shape
    if g_idx is not None:
        g_idx = g_idx.long()
        w = (codes.to(dtype) - zero.to(dtype)[:, g_idx]) * scale.to(dtype)[:, g_idx]
        return w[:, : in_features or k]
    g = k // scale.shape[1]
    w = (codes.reshape(n, -1, g).to(dtype) - zero.to(dtype).unsqueeze(2)) * scale.to(dtype).unsqueeze(2)
    return w.reshape(n, k)[:, : in_features or k]


# --- Quantized modules: plain buffers, one-line forward ----------------------------------------


class QuantizedLinear(nn.Module):
    """Base of the quantized linears: shapes, an optional float bias, and the empty constructor
    that a checkpoint loader fills with load_state_dict(assign=True)."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _set_bias(self, linear: nn.Linear):
        if linear.bias is not None:
            self.bias = linear.bias.detach().float().clone()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # [B, S, K] -> [B*S, K]


class Int8WeightLinear(QuantizedLinear):
    """W8A16: y = x @ (codes * scale).T, with int8 codes [N, K] and a float scale per row."""

    kind = "int8_weight"

    def __init__(self, in_features, out_features, bias):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features))

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes, scale):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        m.weight, m.scale = codes, scale.float()
        m._set_bias(linear)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme, **_):
        return cls.from_codes(linear, *int8_per_channel(linear.weight))

    def forward(self, x):
        # CPU's int8-weight kernel (gpt-fast's path) wins for a few rows (decoding) but is far
        # slower than a float GEMM over long prompts: there, dequantize on the fly.
        if x.device.type == "cpu" and x.numel() // x.shape[-1] <= 16:
            y = torch._weight_int8pack_mm(_flat(x), self.weight, self.scale.to(x.dtype)).reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype).unsqueeze(1))
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4WeightLinear(QuantizedLinear):
    """W4A16: codes packed two per byte [N, Kp/2], float16 scale and uint8 zero per group [N, Kp/g]
    (Kp: in_features padded to whole groups); the weight is dequantized on the fly for each call."""

    kind = "int4_weight"

    def __init__(self, in_features, out_features, bias, group_size: int, act_order: bool = False):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        width = padded_width(in_features, group_size)
        groups = width // group_size
        self.register_buffer("qweight", torch.empty(out_features, width // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("zero", torch.empty(out_features, groups, dtype=torch.uint8))
        # GPTQ act-order: the group of each (padded) input column; otherwise groups are consecutive.
        self.register_buffer("g_idx", torch.empty(width, dtype=torch.int32) if act_order else None)

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes, scale, zero, group_size, g_idx=None):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, g_idx is not None)
        m.qweight, m.scale, m.zero = pack_int4(codes), scale.half(), zero.to(torch.uint8)
        if g_idx is not None:
            m.g_idx = g_idx.to(torch.int32)
        m._set_bias(linear)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme, **_):
        codes, scale, zero = int4_groupwise(linear.weight, scheme.group_size, scheme.symmetric)
        return cls.from_codes(linear, codes, scale, zero, scheme.group_size)

    def dequantized_weight(self, dtype=torch.float32):
        return dequantize_int4(self.qweight, self.scale, self.zero, dtype, self.in_features, self.g_idx)

    def forward(self, x):
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Int8DynamicLinear(QuantizedLinear):
    """W8A8: int8 weight [N, K] per channel; the input is rounded to int8 per token (dynamic) or
    with one calibrated scale (static, `input_scale` holds it), then int8 x int8 -> int32."""

    kind = "int8_w8a8"

    def __init__(self, in_features, out_features, bias, static: bool = False):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features))
        self.register_buffer("input_scale", torch.empty(()) if static else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme, input_absmax: Optional[torch.Tensor] = None, **_):
        static = scheme.activations == "static"
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, static)
        m.weight, m.scale = int8_per_channel(linear.weight)
        if static:
            if input_absmax is None:
                raise ValueError("static W8A8 needs the input's calibrated absmax for every linear")
            m.input_scale = (input_absmax.float().max() / 127.0).clamp(min=1e-12).reshape(())
        m._set_bias(linear)
        return m

    def forward(self, x):
        x2 = _flat(x).float()  # [M, K]
        if self.input_scale is None:
            xs = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # [M, 1], per token
        else:
            xs = self.input_scale
        xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
        y = _int8_matmul(xq, self.weight).float() * xs * self.scale  # int32 [M, N] -> float
        y = y.reshape(*x.shape[:-1], -1)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


EXACT_FLOAT_COLUMNS = 1024  # 1024 * 127 * 127 < 2**24: such int8 dot products are exact in float32


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] @ int8 b [N, K].T -> int32 [M, N], exactly.

    CUDA: torch._int_mm (its kernel wants more than 16 rows: decoding inputs are padded).
    CPU: torch._int_mm is a plain loop there, ~35x slower than a float GEMM, so the same integer
    products run as float32 GEMMs over column chunks short enough to be exact, summed in int32.
    """
    m = a.shape[0]
    if a.is_cuda:
        if m <= 16:
            a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
        return torch._int_mm(a, b.t())[:m]
    out = torch.zeros(m, b.shape[0], dtype=torch.int32)
    for k0 in range(0, a.shape[1], EXACT_FLOAT_COLUMNS):
        chunk = slice(k0, k0 + EXACT_FLOAT_COLUMNS)
        out += (a[:, chunk].float() @ b[:, chunk].float().t()).to(torch.int32)
    return out


class BnB4bitLinear(QuantizedLinear):
    """bitsandbytes NF4/FP4: packed 4-bit weight, an absmax per block of 64, the 16-entry code
    book; forward is bitsandbytes' matmul_4bit."""

    kind = "bnb_4bit"
    blocksize = 64

    def __init__(self, in_features, out_features, bias, quant_type: str = "nf4"):
        super().__init__(in_features, out_features, bias)
        self.quant_type = quant_type
        n = in_features * out_features
        self.register_buffer("qweight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8))
        self.register_buffer("absmax", torch.empty(-(-n // self.blocksize)))
        self.register_buffer("code", torch.empty(16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme, **_):
        import bitsandbytes.functional as bnbf

        m = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme.kind)
        packed, state = bnbf.quantize_4bit(
            linear.weight.detach().float().contiguous(), blocksize=cls.blocksize, quant_type=scheme.kind
        )
        m.qweight, m.absmax, m.code = packed, state.absmax.float(), state.code.float()
        m._set_bias(linear)
        return m

    def quant_state(self, dtype):
        from bitsandbytes.functional import QuantState

        return QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.code,
            blocksize=self.blocksize, quant_type=self.quant_type, dtype=dtype,
        )

    def forward(self, x):
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.qweight.t(), quant_state=self.quant_state(x.dtype), bias=self.bias)


class BnBInt8Linear(QuantizedLinear):
    """bitsandbytes LLM.int8: int8 weight rows with their absmax (SCB); input columns holding an
    outlier above `threshold` run in floating point, the rest as int8 (bitsandbytes' matmul)."""

    kind = "bnb_int8"
    threshold = 6.0

    def __init__(self, in_features, out_features, bias):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("SCB", torch.empty(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme, **_):
        import bitsandbytes.functional as bnbf

        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        codes, row_absmax, _ = bnbf.int8_vectorwise_quant(linear.weight.detach().float().contiguous())
        m.weight, m.SCB = codes, row_absmax.float()
        m._set_bias(linear)
        return m

    def forward(self, x):
        import bitsandbytes as bnb
        from bitsandbytes.autograd._functions import MatmulLtState

        state = MatmulLtState()
        state.CB, state.SCB, state.threshold = self.weight, self.SCB, self.threshold
        state.has_fp16_weights, state.is_training = False, False
        # LLM.int8 computes in float16 (bitsandbytes would cast, with a warning on every call).
        y = bnb.matmul(x.half(), self.weight, bias=None if self.bias is None else self.bias.half(), state=state)
        return y.to(x.dtype)


MODULES: dict[str, type] = {
    cls.kind: cls for cls in (Int8WeightLinear, Int4WeightLinear, Int8DynamicLinear, BnB4bitLinear, BnBInt8Linear)
}


def _empty_module(kind: str, in_features: int, out_features: int, bias: bool, scheme):
    """The module of `kind` with uninitialized buffers, ready for load_state_dict(assign=True)."""
    cls = MODULES[kind]
    if cls is Int4WeightLinear:
        return cls(in_features, out_features, bias, scheme.group_size, scheme.act_order)
    if cls is Int8DynamicLinear:
        return cls(in_features, out_features, bias, static=scheme.activations == "static")
    if cls is BnB4bitLinear:
        return cls(in_features, out_features, bias, scheme.kind)
    return cls(in_features, out_features, bias)


# --- Model walking, calibration ----------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from armquant.models import _decoder

    return _decoder(model).layers


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears that a scheme quantizes: those inside decoder layers (not embeddings or LM head)."""
    layers = _decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    return {
        f"{prefix}.{name}": m
        for name, m in layers.named_modules()
        if isinstance(m, (nn.Linear, QuantizedLinear))
    }


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantized_scheme(model: nn.Module):
    """The scheme a model was quantized with, or None."""
    return getattr(model, "quantization_scheme", None)


@contextlib.contextmanager
def calibration_mode(model: nn.Module):
    """No gradients, eval mode, no KV cache; the model's previous state comes back afterwards."""
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache


@contextlib.contextmanager
def forward_hooks(modules: dict[str, nn.Module], fn: Callable):
    """Register `fn(name, module, inputs, output)` on each module; always removed on exit."""
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: fn(name, mod, i, o)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _check_windows(data, what: str) -> torch.Tensor:
    if data is None:
        raise ValueError(
            f"{what} needs calibration data: pass data=token windows (LongTensor [n, length]), e.g. "
            "armquant.data.token_windows(tokenizer, armquant.data.load_texts('sotu', 'calibration'), 512, 64)"
        )
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long or data.shape[0] == 0:
        raise ValueError(f"calibration data must be a non-empty LongTensor [n, length] of token ids; got {type(data).__name__}")
    return data


def observe_input_absmax(model: nn.Module, windows: torch.Tensor, names=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| [K] of each target linear's input over the calibration windows.

    (The calibration report of `armquant calibrate` records the same statistic; this small pass
    is what static W8A8 and SmoothQuant read.)
    """
    from tqdm import tqdm

    targets = target_linears(model)
    if names is not None:
        targets = {n: targets[n] for n in names}
    stats: dict[str, torch.Tensor] = {}

    def observe(name, module, inputs, output):
        amax = _flat(inputs[0]).abs().amax(dim=0).float()
        stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

    device = next(model.parameters()).device
    with calibration_mode(model), forward_hooks(targets, observe):
        for row in tqdm(windows, desc="calibrating", disable=not progress, unit="window"):
            model(row.unsqueeze(0).to(device))
    return stats


# --- Scheme handlers ---------------------------------------------------------------------------

HANDLERS: dict[type, Callable] = {}


def _handles(scheme_type):
    def register(fn):
        HANDLERS[scheme_type] = fn
        return fn

    return register


def _swap_all(model, scheme, cls, per_name=None):
    for name, linear in target_linears(model).items():
        extra = per_name(name) if per_name else {}
        _set_module(model, name, cls.from_linear(linear, scheme, **extra))


@_handles(BnB)
def _quantize_bnb(model, scheme: BnB, data, progress):
    _swap_all(model, scheme, BnBInt8Linear if scheme.kind == "int8" else BnB4bitLinear)


@_handles(W8A16)
@_handles(W4A16)
def _quantize_weight_only(model, scheme, data, progress):
    if scheme.method == "rtn":
        _swap_all(model, scheme, Int8WeightLinear if isinstance(scheme, W8A16) else Int4WeightLinear)
    else:
        _gptq_model(model, scheme, _check_windows(data, "GPTQ"), progress)


def _smoothing_pairs(layer: nn.Module, model_type: str):
    """(producer, consumer linear names inside the layer, producer offset) for SmoothQuant:
    the norm before attention feeds q/k/v, the norm before the MLP feeds gate/up, and up_proj's
    rows feed down_proj (through act(gate) * up, so ARM on the gate branch is untouched)."""
    mlp_norm = "pre_feedforward_layernorm" if model_type == "gemma3_text" else "post_attention_layernorm"
    offset = 1.0 if model_type == "gemma3_text" else 0.0  # Gemma's RMSNorm scales by (1 + weight)
    return [
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], offset),
        (mlp_norm, ["mlp.gate_proj", "mlp.up_proj"], offset),
        ("mlp.up_proj", ["mlp.down_proj"], 0.0),
    ]


def _apply_smoothquant(model, stats: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold SmoothQuant scales into the model and divide the recorded input absmax to match."""
    from armquant.smoothquant import smooth, smoothing_scales

    layers = _decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    for i, layer in enumerate(layers):
        for producer_name, consumer_names, offset in _smoothing_pairs(layer, model.config.model_type):
            producer = layer.get_submodule(producer_name).weight
            consumers = [layer.get_submodule(c) for c in consumer_names]
            key = f"{prefix}.{i}.{consumer_names[0]}"
            s = smoothing_scales(stats[key], [c.weight for c in consumers], alpha)
            new_producer, new_weights = smooth(s, producer.data, [c.weight.data for c in consumers], offset)
            producer.data.copy_(new_producer)
            for c, w in zip(consumers, new_weights):
                c.weight.data.copy_(w)
            for c in consumer_names:
                stats[f"{prefix}.{i}.{c}"] = stats[f"{prefix}.{i}.{c}"] / s


@_handles(W8A8)
def _quantize_w8a8(model, scheme: W8A8, data, progress):
    stats = None
    if scheme.smoothquant_alpha is not None or scheme.activations == "static":
        what = "SmoothQuant" if scheme.smoothquant_alpha is not None else "static W8A8"
        stats = observe_input_absmax(model, _check_windows(data, what), progress=progress)
    if scheme.smoothquant_alpha is not None:
        _apply_smoothquant(model, stats, scheme.smoothquant_alpha)
    _swap_all(model, scheme, Int8DynamicLinear, lambda name: {"input_absmax": stats[name] if stats else None})


def _arm_context(model):
    """The token context that ARM reads (mask, positions), if the model carries ARM."""
    from armquant.models import arm_sites

    sites = arm_sites(model)
    return next(iter(sites.values()))._context if sites else None


@contextlib.contextmanager
def _one_thread():
    """GPTQ's column loop is thousands of tiny ops: intra-op threads only add synchronization
    (26x slower with 2 threads than with 1 on a busy 2-core machine, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _StopForward(Exception):
    pass


def _gptq_linear(linear: nn.Linear, hessian: torch.Tensor, scheme) -> nn.Module:
    """The quantized module of `linear` by GPTQ with its input Hessian, in the scheme's layout."""
    from armquant.gptq import gptq

    if isinstance(scheme, W8A16):
        # One group per row on the symmetric 8-bit grid: codes - 128 are the int8 codes (-128..127).
        codes, scale, _, _ = gptq(linear.weight, hessian, linear.in_features, True, scheme.act_order, scheme.damp, bits=8)
        return Int8WeightLinear.from_codes(linear, (codes.to(torch.int16) - 128).to(torch.int8), scale[:, 0])
    width = padded_width(linear.in_features, scheme.group_size)
    hessian = F.pad(hessian, (0, width - linear.in_features, 0, width - linear.in_features))
    codes, scale, zero, g_idx = gptq(  # padding columns: zero weight, zero Hessian, so they stay 0
        pad_columns(linear.weight, width), hessian, scheme.group_size, scheme.symmetric, scheme.act_order, scheme.damp,
    )
    return Int4WeightLinear.from_codes(linear, codes, scale, zero, scheme.group_size, g_idx)


def _gptq_model(model, scheme, windows: torch.Tensor, progress: bool) -> None:
    """Sequential GPTQ: capture the first decoder layer's inputs, then for each layer accumulate
    its linears' Hessians (hooks), quantize them, and run the quantized layer to make the next
    layer's inputs, so each layer sees the error of those before it."""
    from tqdm import tqdm

    from armquant.gptq import accumulate_hessian

    layers = _decoder_layers(model)
    context = _arm_context(model)
    device = next(model.parameters()).device
    captured = []  # per window: (hidden states, kwargs, ARM context)

    def capture(module, args, kwargs):
        arm_ctx = (context.mask, context.positions) if context is not None else None
        captured.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items() if k != "hidden_states"}, arm_ctx))
        raise _StopForward

    with calibration_mode(model):
        handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for row in windows:
                try:
                    model(row.unsqueeze(0).to(device))
                except _StopForward:
                    pass
        finally:
            handle.remove()
            if context is not None:
                context.mask = context.positions = None

        def run_layer(layer, i):
            out = []
            for hidden, kwargs, arm_ctx in captured:
                if context is not None:
                    context.mask, context.positions = arm_ctx
                y = layer(hidden, **kwargs)
                out.append(y[0] if isinstance(y, tuple) else y)
            if context is not None:
                context.mask = context.positions = None
            return out

        prefix = next(name for name, m in model.named_modules() if m is layers)
        for i, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer", disable=not progress)):
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            hessians = {n: (torch.zeros(m.in_features, m.in_features, device=device), 0) for n, m in linears.items()}

            def accumulate(name, module, inputs, output):
                hessians[name] = accumulate_hessian(*hessians[name], inputs[0])

            with forward_hooks(linears, accumulate):
                run_layer(layer, i)
            for name, linear in linears.items():
                with _one_thread():
                    _set_module(layer, name, _gptq_linear(linear, hessians[name][0], scheme))
            del hessians
            outputs = run_layer(layer, i)
            captured[:] = [(h, kw, a) for h, (_, kw, a) in zip(outputs, captured)]
            log.info("GPTQ: %s.%d done", prefix, i)


def _check_quantizable(model: nn.Module, scheme) -> None:
    if type(scheme) not in HANDLERS:
        raise TypeError(
            f"unknown quantization scheme {scheme!r}; pass one of {', '.join(c.__name__ for c in HANDLERS)}() "
            f"or a name: {', '.join(NAMED)}"
        )
    previous = quantized_scheme(model)
    if previous is not None or any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(
            f"this model is already quantized ({previous.describe() if previous else 'quantized modules found'}); "
            "load the floating-point checkpoint and quantize that instead"
        )
    if isinstance(scheme, W4A16):
        padded = sorted({m.in_features for m in target_linears(model).values() if m.in_features % scheme.group_size})
        if padded:
            log.info("group_size=%d does not divide in_features %s: those layers are padded with zero columns "
                     "to whole groups (the last group of each row is partial)", scheme.group_size, padded)


def quantize(model: nn.Module, scheme, data: Optional[torch.Tensor] = None, progress: bool = False) -> nn.Module:
    """Quantize `model` in place with `scheme` (a config such as W4A16(...), or a name from NAMED).

    data: calibration token windows, LongTensor [n, length]; needed by GPTQ, SmoothQuant and
    static W8A8 (use the calibration split, never the evaluation split).
    Returns the model, with `model.quantization_scheme` set.
    """
    if isinstance(scheme, str):
        scheme = scheme_from_name(scheme)
    _check_quantizable(model, scheme)
    start = time.perf_counter()
    HANDLERS[type(scheme)](model, scheme, data, progress)
    model.quantization_scheme = scheme
    log.info("quantized with %s in %.1f s", scheme.describe(), time.perf_counter() - start)
    return model


# --- Simulation -------------------------------------------------------------------------------


def fake_quantize(model: nn.Module, scheme) -> nn.Module:
    """Simulated quantization (accuracy studies only): round the target linears' weights to the
    scheme's grid and back, in place, keeping float storage and float matmuls. Weight-only
    round-to-nearest schemes (W8A16, W4A16 rtn) only."""
    if isinstance(scheme, str):
        scheme = scheme_from_name(scheme)
    if not isinstance(scheme, (W8A16, W4A16)) or getattr(scheme, "method", "rtn") != "rtn":
        raise ValueError(f"fake_quantize simulates W8A16 and W4A16(method='rtn') only; got {scheme.describe()}")
    _check_quantizable(model, scheme)
    with torch.no_grad():
        for linear in target_linears(model).values():
            if isinstance(scheme, W8A16):
                codes, scale = int8_per_channel(linear.weight)
                w = codes.float() * scale.unsqueeze(1)
            else:
                codes, scale, zero = int4_groupwise(linear.weight, scheme.group_size, scheme.symmetric)
                w = dequantize_int4(pack_int4(codes), scale, zero, in_features=linear.in_features)
            linear.weight.copy_(w.to(linear.weight.dtype))
    return model


# --- Checkpoints ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: saved once, re-tied on load
    return {k: v.contiguous() for k, v in state.items()}


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of `model` holds (tied weights counted once)."""
    return sum(t.numel() * t.element_size() for t in _state_dict_for_saving(model).values())


def save_quantized(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a quantized checkpoint atomically: packed safetensors, configs, tokenizer."""
    from safetensors.torch import save_file

    from armquant.models import ARM_CONFIG_FILE

    scheme = quantized_scheme(model)
    if scheme is None:
        raise ValueError("the model is not quantized; call armquant.quantize(model, scheme) first (or use armquant.models.save)")
    modules = {name: m.kind for name, m in target_linears(model).items()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(_state_dict_for_saving(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        arm_config = getattr(model, "arm_config", None)
        if arm_config is not None:
            (tmp / ARM_CONFIG_FILE).write_text(json.dumps(arm_config.to_dict(), indent=2) + "\n")
        config = {
            "format_version": FORMAT_VERSION,
            "scheme": scheme.to_dict(),
            "modules": modules,
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE)},
        }
        (tmp / QUANT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def _read_quant_config(path: Path) -> dict:
    file = path / QUANT_CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is unreadable or not JSON ({error}); re-create the checkpoint with `armquant quantize`") from error
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {config.get('format_version')!r}; this armquant reads {FORMAT_VERSION}")
    for key in ("scheme", "modules", "weights"):
        if key not in config:
            raise ValueError(f"{file} lacks {key!r}; re-create the checkpoint with `armquant quantize`")
    return config


def _load_weights(path: Path, config: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / config["weights"]["file"]
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the quantized checkpoint at {path} is incomplete")
    expected = config["weights"].get("sha256")
    if expected and _sha256(file) != expected:
        raise ValueError(
            f"{file} is corrupt or truncated: its sha256 differs from the one recorded in {QUANT_CONFIG_FILE}; "
            "re-create the checkpoint with `armquant quantize`"
        )
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error}); re-create the checkpoint") from error


def load_quantized(path: str | os.PathLike, arm=None, layers=None, device: str = "cpu"):
    """Load a checkpoint written by save_quantized: (model, tokenizer).

    The skeleton is built without allocating its weights (meta device), the quantized modules are
    swapped in, and the saved tensors are assigned, not copied. ARM is applied as
    `armquant.models.load` does (arm/layers override the saved arm_config.json).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from armquant.models import ARM_CONFIG_FILE, ARMModelConfig, _resolve_arm, apply_arm

    path = Path(path)
    qconfig = _read_quant_config(path)
    scheme = scheme_from_dict(qconfig["scheme"])
    state = _load_weights(path, qconfig)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers computed for real
        model = AutoModelForCausalLM.from_config(config)
    for name, kind in qconfig["modules"].items():
        if kind not in MODULES:
            raise ValueError(f"{path / QUANT_CONFIG_FILE}: module {name} has unknown kind {kind!r}")
        try:
            linear = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{path / QUANT_CONFIG_FILE} names module {name}, which config.json's model lacks") from error
        with torch.device("meta"):
            module = _empty_module(kind, linear.in_features, linear.out_features, linear.bias is not None, scheme)
        _set_module(model, name, module)
    tied = getattr(config, "tie_word_embeddings", False)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path / WEIGHTS_FILE} does not match its configuration: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; re-create the checkpoint"
        )
    for name, module in model.named_modules():
        for shape_owner, tensor in list(module.named_buffers(recurse=False)) + list(module.named_parameters(recurse=False)):
            if tensor is not None and tensor.device.type == "meta" and not (tied and name == "lm_head"):
                raise ValueError(f"{name}.{shape_owner} was not loaded from {path / WEIGHTS_FILE}")
    if tied:
        model.tie_weights()
    model = model.to(device).eval()
    model.quantization_scheme = scheme
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    saved = None
    if (path / ARM_CONFIG_FILE).is_file():
        saved = ARMModelConfig.from_dict(json.loads((path / ARM_CONFIG_FILE).read_text()))
    arm_config = _resolve_arm(model, arm, layers, saved)
    if arm_config is not None:
        apply_arm(model, arm_config)
    return model, tokenizer


# --- CLI -------------------------------------------------------------------------------------


def _scheme_from_args(args):
    scheme = scheme_from_name(args.scheme)
    overrides = {
        "group_size": args.group_size, "symmetric": args.symmetric, "method": args.method,
        "act_order": args.act_order, "activations": args.activations,
        "smoothquant_alpha": args.smoothquant_alpha,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(scheme)}
    if "method" in overrides and "act_order" not in overrides and "act_order" in fields:
        overrides["act_order"] = None  # the new method's default, not the named scheme's
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"scheme {args.scheme} takes no {', '.join('--' + b.replace('_', '-') for b in bad)}")
    return dataclasses.replace(scheme, **overrides)


def _cmd_quantize(args) -> int:
    from armquant.models import load_from_args

    scheme = _scheme_from_args(args)
    model, tokenizer = load_from_args(args)
    data = None
    needs_data = getattr(scheme, "method", None) == "gptq" or (
        isinstance(scheme, W8A8) and (scheme.activations == "static" or scheme.smoothquant_alpha is not None)
    )
    if needs_data:
        from armquant.data import load_texts, token_windows

        data = token_windows(tokenizer, load_texts(args.calib_data), args.calib_length, args.calib_windows)
    start = time.perf_counter()
    quantize(model, scheme, data=data, progress=True)
    seconds = time.perf_counter() - start
    out = save_quantized(model, tokenizer, args.out_dir, overwrite=args.overwrite)
    print(f"quantized with {scheme.describe()} in {seconds:.1f} s; wrote {out} ({checkpoint_bytes(model) / 1e6:.1f} MB of tensors)")
    return 0


def add_cli(subparsers) -> None:
    from armquant.models import add_arm_arguments

    p = subparsers.add_parser(
        "quantize", help="quantize a model (INT8, INT4 RTN/GPTQ, W8A8 + SmoothQuant, bitsandbytes) and save it",
        description="Quantize the linear layers of MODEL's decoder with a scheme and write a checkpoint holding the "
        "packed integers (armquant.models.load reads it back). ARM stays in floating point.",
    )
    p.add_argument("model", help="bundled name, .gguf file or floating-point checkpoint folder")
    p.add_argument("out_dir", help="output checkpoint folder (must not exist unless --overwrite)")
    p.add_argument("--scheme", required=True, choices=list(NAMED), help="a named scheme; the options below adjust it")
    p.add_argument("--group-size", type=int, help="W4A16: input columns per scale (32, 64, 128)")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None, help="W4A16: symmetric grid")
    p.add_argument("--method", choices=["rtn", "gptq"], help="W8A16, W4A16: round-to-nearest or GPTQ")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by decreasing Hessian diagonal (default: on for GPTQ)")
    p.add_argument("--activations", choices=["dynamic", "static"], help="W8A8: per-token or calibrated per-tensor scales")
    p.add_argument("--smoothquant-alpha", type=float, help="W8A8: SmoothQuant strength (0.5 is usual)")
    p.add_argument("--calib-data", default="sotu:calibration", help="calibration text (default: %(default)s)")
    p.add_argument("--calib-windows", type=positive_int, default=64, help="calibration windows (default: %(default)s)")
    p.add_argument("--calib-length", type=int, default=512, help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    add_arm_arguments(p)
    p.set_defaults(handler=_cmd_quantize)
