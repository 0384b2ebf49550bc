"""The CUDA kernel's algorithm, emulated on the host, against the reference bit for bit.

export/cuda/arm_cuda_emulate.cpp runs the CUDA kernel's two plans (radix select passes; one
65536-bin histogram for 16-bit dtypes) one group at a time on the same arithmetic header as the
kernel (export/cuda/arm_cuda_core.cuh). This catches mistakes in keys, digit selection, the
MAD-from-histogram step, formulas and the tie rule on machines without a GPU; the GPU itself is
checked by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from armquant.arm import PRESETS, ARMConfig, arm_reference
from armquant._native import KernelAttrs

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "export" / "cuda" / "arm_cuda_emulate.cpp"
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCOPES = {"tensor": 0, "sequence": 1, "token": 2}
RADIX, HIST16 = 1, 2


attrs_of = KernelAttrs.of


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build export/cuda/arm_cuda_emulate.cpp")
    lib = tmp_path_factory.mktemp("emu") / "libarm_cuda_emulate.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC",
                    "-o", str(lib), str(SOURCE)], check=True, timeout=300)
    return ctypes.CDLL(str(lib))


def emulate(lib, method, x, mask, positions, config):
    x3 = x.contiguous().reshape(-1, *x.shape[-2:]) if x.dim() == 3 else x.reshape(1, *x.shape)
    B, S, I = x3.shape
    y = torch.empty_like(x3)
    mask_type = 0
    if mask is not None:
        mask = mask.to(torch.uint8 if mask.dtype == torch.bool else torch.int64).contiguous()
        mask_type = 1 if mask.dtype == torch.uint8 else 2
    if positions is not None:
        positions = positions.to(torch.int64).contiguous()
    attrs = attrs_of(config)
    rc = lib.armq_emulate_forward(
        ctypes.c_int(method), ctypes.c_int(DTYPES[x.dtype]), ctypes.c_void_p(x3.data_ptr()),
        ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(B), ctypes.c_int64(S), ctypes.c_int64(I),
        ctypes.c_void_p(mask.data_ptr() if mask is not None else None), ctypes.c_int(mask_type),
        ctypes.c_void_p(positions.data_ptr() if positions is not None else None), ctypes.byref(attrs))
    assert rc == 0
    return y.reshape(x.shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


def cases(dtype, seed):
    """(name, x, mask, positions): shapes, ties, signed zeros, non-finite values, masks."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)
    out = [
        ("normal", randn(2, 3, 37), None, None),
        ("one element", randn(1, 1, 1), None, None),
        ("one channel", randn(2, 5, 1), None, None),
        ("silu", torch.nn.functional.silu(randn(2, 4, 96) * 2), None, None),
        ("negative only", -randn(2, 3, 20).abs() - 0.01, None, None),
        ("zeros both signs", torch.where(randn(2, 3, 16) > 0, 0.0, -0.0), None, None),
        ("few values", torch.tensor([-1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0])[
            torch.randint(0, 7, (2, 4, 33), generator=g)], None, None),
    ]
    x = randn(2, 3, 24)
    x[0, 1, 3], x[1, 2, 0], x[1, 0, 5], x[0, 0, 0] = float("nan"), float("inf"), -float("inf"), float("nan")
    out.append(("non-finite", x, None, None))
    out.append(("all non-finite row", torch.full((2, 2, 5), float("nan")), None, None))
    mask = torch.rand(3, 4, generator=g) > 0.3
    mask[1] = False
    out.append(("bool mask, masked row", randn(3, 4, 19), mask, None))
    out.append(("int64 mask", randn(2, 5, 13), (torch.rand(2, 5, generator=g) > 0.5).long(), None))
    positions = torch.randint(-(2**40), 2**40, (2, 3), generator=g)
    out.append(("positions", randn(2, 3, 29), None, positions))
    out.append(("rank 2", randn(6, 11), None, None))
    x = randn(2, 3, 41) * 1e-3
    x[0, 0, :5] = 6e4  # large values near float16's limit
    out.append(("wide range", x, None, None))
    return [(name, x.to(dtype), m, p) for name, x, m, p in out]


CONFIGS = [
    PRESETS["qwen2.5"],
    PRESETS["llama-3.1"],
    PRESETS["gemma-3"],
    ARMConfig(k=4.0, pmin=0.0, pmax=1.0, p1=0.0, seed=2**62 + 12345),
    ARMConfig(c=0.5, share="fixed", p1=100.0, percentile_of="signed", seed=7),
    ARMConfig(c=1.0, share="fixed", p1=37.3, percentile_of="abs"),
]


@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("dtype,method", [
    pytest.param(torch.float32, RADIX, id="float32-radix"),
    pytest.param(torch.float16, RADIX, id="float16-radix"),
    pytest.param(torch.bfloat16, RADIX, id="bfloat16-radix"),
    pytest.param(torch.float16, HIST16, id="float16-hist16"),
    pytest.param(torch.bfloat16, HIST16, id="bfloat16-hist16"),
])
def test_emulation_matches_reference(emulator, dtype, method, scope):
    for c, config in enumerate(CONFIGS):
        config = config.replace(scope=scope)
        for name, x, mask, positions in cases(dtype, seed=c):
            want = arm_reference(x, mask, positions, config)
            got = emulate(emulator, method, x, mask, positions, config)
            mismatch = (bits(got) != bits(want)).sum().item()
            assert mismatch == 0, f"{name}, {config}: {mismatch} elements differ"


def test_emulation_changes_values(emulator):
    # Guard against a vacuous pass: the op must move some elements on ordinary input.
    x = torch.randn(2, 4, 64).to(torch.bfloat16)
    y = emulate(emulator, HIST16, x, None, None, PRESETS["llama-3.1"])
    assert (bits(y) != bits(x)).sum().item() > 0


def test_philox_known_answers_through_uniform(emulator):
    # The spec's first known answer (counter 0, key 0) gives u = (0x6627e8d5 >> 8) * 2^-24 for
    # channel 0, position 0, seed 0; a selected positive element becomes u * Qp. With N = 1 the
    # element is selected and Qp is the element itself.
    x = torch.tensor([[[3.0]]])
    y = emulate(emulator, RADIX, x, None, None, ARMConfig())
    u = np.float32((0x6627E8D5 >> 8) * 2.0**-24)
    assert y.item() == float(np.float32(u * np.float32(3.0)))
