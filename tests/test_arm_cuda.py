"""The CUDA ARM kernel through the PyTorch binding, bit for bit against the reference (GPU only).

The thorough GPU check, with benchmark sizes, CUDA graphs and timing, is
benchmarks/gpu_check.sh; this is the quick version that CI runs where a GPU exists.
"""

from __future__ import annotations

import pytest
import torch

from armquant.arm import PRESETS, ARMConfig, arm_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        from armquant import _native
    except ImportError:
        pytest.skip("armquant._native (the ctypes binding) is not in this checkout")
    kernel = _native.kernel("cuda")
    if kernel is None:
        pytest.skip("the native library was built without the CUDA kernel (no nvcc at build time)")
    return kernel


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scope", ["tensor", "sequence", "token"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 37), (3, 40, 257), (70, 2, 64)])
def test_cuda_matches_reference(cuda_kernel, dtype, scope, shape):
    g = torch.Generator().manual_seed(1000 * shape[0] + 10 * shape[1] + shape[2] + len(scope))
    x = torch.nn.functional.silu(torch.randn(*shape, generator=g) * 2)
    x.view(-1)[:: max(1, x.numel() // 5)] = 0.0  # ties at zero
    x = x.to(dtype)
    mask = torch.rand(shape[:2], generator=g) > 0.25
    positions = torch.randint(0, 2**40, shape[:2], generator=g)
    for config in (PRESETS["qwen2.5"], PRESETS["llama-3.1"], PRESETS["gemma-3"], ARMConfig(pmin=0.0, pmax=1.0, k=5.0)):
        config = config.replace(scope=scope)
        want = arm_reference(x, mask, positions, config)
        got = cuda_kernel(x.cuda(), mask.cuda(), positions.cuda(), config).cpu()
        assert torch.equal(bits(got), bits(want)), f"{config}: {(bits(got) != bits(want)).sum().item()} differ"
