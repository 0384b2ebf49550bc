"""The native ARM kernels (CPU, CUDA) and the ONNX Runtime custom-op library, through ctypes.

One shared library, `libarmquant_ort.so` (built from `export/` by `pip install -e .`), carries
the CPU kernel, the CUDA kernel when nvcc was found, and `RegisterCustomOps` for ONNX Runtime.
PyTorch reaches the kernels here through the C ABI in `export/include/arm_kernel.h`, so no
extension is built against torch's C++ ABI. `armquant.arm` calls `kernel(device_type)` inside
`torch.ops.armquant.arm` and falls back to the reference when it returns None.

Rebuild by hand: `python -m armquant._native --build` (needs cmake and a C++ compiler).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from armquant import _build
from armquant.arm import ARMConfig, _check_inputs

__all__ = ["ort_library_path", "library_path", "kernel", "has_cuda", "cpu_isa"]

logger = logging.getLogger(__name__)

LIBRARY_NAME = _build.LIBRARY_NAME
_LIBRARY_ENV = "ARMQUANT_LIBRARY"  # an explicit path to libarmquant_ort.so
_PACKAGE_LIB = _build.PACKAGE_LIB_DIR / LIBRARY_NAME
_EXPORT_DIR = _build.EXPORT_DIR

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MASK_NONE, _MASK_BOOL, _MASK_INT64 = 0, 1, 2
_SCOPES = {"tensor": 0, "sequence": 1, "token": 2}


class KernelAttrs(ctypes.Structure):
    """armq_attrs of export/include/arm_kernel.h, for every ctypes caller of the kernels."""

    _fields_ = [
        ("c", ctypes.c_float), ("p1", ctypes.c_float), ("k", ctypes.c_float),
        ("pmin", ctypes.c_float), ("pmax", ctypes.c_float), ("kappa", ctypes.c_float),
        ("share_fixed", ctypes.c_int32), ("percentile_abs", ctypes.c_int32),
        ("scope", ctypes.c_int32), ("seed", ctypes.c_uint64),
    ]

    @classmethod
    def of(cls, config: ARMConfig) -> "KernelAttrs":
        return cls(
            config.c, config.p1, config.k, config.pmin, config.pmax, config.kappa,
            int(config.share == "fixed"), int(config.percentile_of == "abs"), _SCOPES[config.scope], config.seed,
        )


def library_path() -> Optional[Path]:
    """The built library: $ARMQUANT_LIBRARY, else the newer of the package's lib/ copy and
    export/build/ (a rebuild by hand with cmake wins over an older install); None if absent."""
    explicit = os.environ.get(_LIBRARY_ENV)
    if explicit:
        return Path(explicit)
    found = [p for p in (_PACKAGE_LIB, _EXPORT_DIR / "build" / LIBRARY_NAME) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def ort_library_path() -> str:
    """Path of the ONNX Runtime custom-op library (op ARM, domain armquant).

    Register it with `SessionOptions.register_custom_ops_library(armquant.ort_library_path())`.
    """
    path = library_path()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{LIBRARY_NAME} is not built (looked in ${_LIBRARY_ENV}, {_PACKAGE_LIB.parent}, "
            f"{_EXPORT_DIR / 'build'}); build it with `python -m armquant._native --build` or "
            "`pip install -e .` (needs cmake and a C++ compiler)"
        )
    return str(path)


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    path = library_path()
    if path is None:
        logger.warning(
            "native ARM kernels are not built (%s not found); using the PyTorch reference. "
            "Build them with `python -m armquant._native --build`", LIBRARY_NAME,
        )
        return None
    try:
        return _load_library(path)
    except OSError as error:
        logger.warning("could not load %s (%s); using the PyTorch reference", path, error)
        return None


def _load_library(path) -> ctypes.CDLL:
    """The library at `path` with its C entry points typed."""
    lib = ctypes.CDLL(str(path))
    forward_args = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(KernelAttrs),
    ]
    lib.armq_cpu_forward.argtypes = forward_args + [ctypes.c_int]
    lib.armq_cpu_forward.restype = ctypes.c_int
    lib.armq_cuda_forward.argtypes = forward_args + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.armq_cuda_forward.restype = ctypes.c_int
    lib.armq_cuda_workspace_bytes.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.POINTER(KernelAttrs)]
    lib.armq_cuda_workspace_bytes.restype = ctypes.c_size_t
    lib.armq_has_cuda.restype = ctypes.c_int
    lib.armq_error_string.argtypes = [ctypes.c_int]
    lib.armq_error_string.restype = ctypes.c_char_p
    lib.armq_philox4x32_10.argtypes = [ctypes.POINTER(ctypes.c_uint32)] * 3
    lib.armq_philox4x32_10.restype = None
    if hasattr(lib, "armq_cpu_isa"):  # builds before it lack it (benchmarks load older builds)
        lib.armq_cpu_isa.restype = ctypes.c_char_p
    return lib


def has_cuda() -> bool:
    """True when the built library carries the CUDA kernel."""
    lib = _library()
    return lib is not None and bool(lib.armq_has_cuda())


def cpu_isa() -> Optional[str]:
    """The vector paths the CPU kernel takes here: "avx512", "avx2" or "portable"; None
    when the library is not built, or built before it could tell."""
    lib = _library()
    return lib.armq_cpu_isa().decode() if lib is not None and hasattr(lib, "armq_cpu_isa") else None


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """The library's Philox4x32-10 (for known-answer tests)."""
    lib = _library()
    if lib is None:
        raise FileNotFoundError(ort_library_path())  # raises with the build instructions
    words = ctypes.c_uint32 * 4
    out = words()
    lib.armq_philox4x32_10(words(*counter), (ctypes.c_uint32 * 2)(*key), out)
    return tuple(out)


def _prepare(x: torch.Tensor, mask: Optional[torch.Tensor], positions: Optional[torch.Tensor]):
    """Contiguous X and [B, S] mask/positions in the ABI's types; returns (x, mask, mask_type, positions, B, S, I)."""
    _check_inputs(x, mask, positions)
    x = x.contiguous()
    B, S, I = (1, *x.shape) if x.dim() == 2 else x.shape
    mask_type = _MASK_NONE
    if mask is not None:
        if mask.dtype == torch.bool:
            mask_type = _MASK_BOOL
        else:
            mask, mask_type = mask.to(torch.int64), _MASK_INT64
        mask = mask.contiguous()
    if positions is not None:
        positions = positions.to(torch.int64).contiguous()
    return x, mask, mask_type, positions, B, S, I


def _pointer(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _raise_on(lib: ctypes.CDLL, code: int, where: str, x: torch.Tensor) -> None:
    if code != 0:
        text = lib.armq_error_string(code).decode()
        raise RuntimeError(f"native ARM kernel ({where}) failed for X {list(x.shape)} {x.dtype}: {text} (code {code})")


def _output(x: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """A fresh output like x, or `out` once it is checked to be one."""
    if out is None:
        return torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {list(x.shape)} on {x.device}, like X; "
                         f"got {out.dtype} {list(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}: pass such a tensor or none")
    x_end, out_end = x.data_ptr() + x.nbytes, out.data_ptr() + out.nbytes
    if out.data_ptr() < x_end and x.data_ptr() < out_end:
        raise ValueError("out shares memory with X, and the kernel does not run in place; pass another tensor or none")
    return out


def _cpu_kernel(lib: ctypes.CDLL) -> Callable:
    def run(x, mask, positions, config: ARMConfig, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, mask, mask_type, positions, B, S, I = _prepare(x, mask, positions)
        y = _output(x, out)
        attrs = KernelAttrs.of(config)
        code = lib.armq_cpu_forward(
            _DTYPES[x.dtype], _pointer(x), _pointer(y), B, S, I, _pointer(mask), mask_type, _pointer(positions),
            ctypes.byref(attrs), torch.get_num_threads(),
        )
        _raise_on(lib, code, "cpu", x)
        return y

    return run


def _cuda_kernel(lib: ctypes.CDLL) -> Callable:
    def run(x, mask, positions, config: ARMConfig, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, mask, mask_type, positions, B, S, I = _prepare(x, mask, positions)
        y = _output(x, out)
        attrs = KernelAttrs.of(config)
        dtype = _DTYPES[x.dtype]
        nbytes = lib.armq_cuda_workspace_bytes(dtype, B, S, I, ctypes.byref(attrs))
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            code = lib.armq_cuda_forward(
                dtype, _pointer(x), _pointer(y), B, S, I, _pointer(mask), mask_type, _pointer(positions),
                ctypes.byref(attrs), workspace.data_ptr(), nbytes, stream,
            )
        _raise_on(lib, code, "cuda", x)
        return y

    return run


@functools.lru_cache(maxsize=None)
def kernel(device_type: str) -> Optional[Callable]:
    """`(x, mask, positions, config, out=None) -> Tensor` running the native kernel on this device
    type, or None. `out` is a preallocated output, as ONNX Runtime's arena gives the op."""
    lib = _library()
    if lib is None:
        return None
    if device_type == "cpu":
        return _cpu_kernel(lib)
    if device_type == "cuda" and lib.armq_has_cuda():
        return _cuda_kernel(lib)
    return None


def cpu_kernel_from(path) -> Callable:
    """The CPU kernel, as `kernel("cpu")`, of another build of the library (benchmarks compare two builds)."""
    return _cpu_kernel(_load_library(path))


# --- Building: armquant/_build.py (torch-free, shared with setup.py) ------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m armquant._native", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build libarmquant_ort.so from export/ with cmake")
    parser.add_argument("--cuda", choices=["AUTO", "ON", "OFF"], default="AUTO", help="build the CUDA kernel (AUTO: when nvcc is found)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.build:
        try:
            target = _build.build(cuda=args.cuda)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"built {target}")
    path = library_path()
    if path is None:
        print(f"{LIBRARY_NAME}: not built")
        return 1
    _library.cache_clear()
    lib = _library()
    cuda = "yes" if lib is not None and lib.armq_has_cuda() else "no"
    print(f"{LIBRARY_NAME}: {path} (CPU paths: {cpu_isa()}; CUDA kernel: {cuda})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
