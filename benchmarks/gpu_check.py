"""GPU check of the CUDA ARM kernel: bit-exact parity, CUDA graph capture, timing.

Run through benchmarks/gpu_check.sh, which builds the library first. Calls the kernel through
ctypes on the built shared library (the C ABI of export/include/arm_kernel.h, the path the
PyTorch binding takes). Prints progress, a table last, and writes gpu_check.json to $OUT (or
--out) when set. Exit status: 0 when every parity and graph check passes, 1 otherwise; the speed
targets are reported, not enforced.

    python benchmarks/gpu_check.py --lib build/gpu_check/libarmquant_cuda.so [--quick]
        [--baseline-lib build/cuda_baseline/libarmquant_cuda.so]

--baseline-lib names a build of an earlier kernel (benchmarks/build_cuda_baseline.sh makes one
from a git revision): it is timed side by side with the new one in this process, its output is
compared with the new one's bit for bit, and the table gains a "new/base" column.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from published_arm import published_arm  # noqa: E402

from armquant._io import write_json  # noqa: E402
from armquant._provenance import provenance  # noqa: E402
from armquant.arm import PRESETS, ARMConfig, arm_reference  # noqa: E402
from armquant import _native  # noqa: E402
from armquant._native import KernelAttrs  # noqa: E402

DTYPES = _native._DTYPES
SCOPES = {"tensor": 0, "sequence": 1, "token": 2}
T0 = time.perf_counter()
DEVICE = "cuda"  # "cpu" only in a smoke test of this script with a stand-in kernel


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


attrs_of = KernelAttrs.of


class CudaARM:
    """armq_cuda_forward through ctypes: x, mask, positions on the current CUDA device."""

    def __init__(self, path: str):
        self.lib = lib = ctypes.CDLL(path)
        if not hasattr(lib, "armq_has_cuda") or lib.armq_has_cuda() != 1:
            raise RuntimeError(f"{path} carries no CUDA kernel (armq_has_cuda() != 1); build it with nvcc")
        lib.armq_cuda_workspace_bytes.restype = ctypes.c_size_t
        lib.armq_cuda_workspace_bytes.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                  ctypes.POINTER(KernelAttrs)]
        lib.armq_cuda_forward.restype = ctypes.c_int
        lib.armq_cuda_forward.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(KernelAttrs), ctypes.c_void_p,
            ctypes.c_size_t, ctypes.c_void_p]
        self.error_string = getattr(lib, "armq_error_string", None)
        if self.error_string is not None:
            self.error_string.restype = ctypes.c_char_p

    def prepare(self, x, mask, positions, config, out=None):
        """Argument tuple for armq_cuda_forward (buffers kept alive in the tuple's owner list)."""
        # As the PyTorch binding prepares them (a contiguous bool mask stays the same tensor).
        x, mask, mask_type, positions, B, S, I = _native._prepare(x, mask, positions)
        y = torch.empty_like(x) if out is None else out
        attrs = attrs_of(config)
        nbytes = self.lib.armq_cuda_workspace_bytes(DTYPES[x.dtype], B, S, I, ctypes.byref(attrs))
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
        keep = [x, y, mask, positions, workspace, attrs]
        args = [DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), B, S, I, _native._pointer(mask), mask_type,
                _native._pointer(positions), ctypes.byref(attrs), workspace.data_ptr(), nbytes]
        return y, args, keep

    def launch(self, args) -> None:
        rc = self.lib.armq_cuda_forward(*args, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if rc != 0:
            text = self.error_string(rc).decode() if self.error_string else f"cudaError_t {rc}"
            raise RuntimeError(f"armq_cuda_forward failed: {text}")

    def __call__(self, x, mask=None, positions=None, config=ARMConfig()):
        y, args, _keep = self.prepare(x, mask, positions, config)
        self.launch(args)
        return y


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


# --- parity ---------------------------------------------------------------------------------


def make_inputs(kind: str, shape, dtype, g: torch.Generator, device):
    """x, mask, positions of one kind, on `device`."""
    B, S, I = shape
    randn = lambda *s: torch.randn(*s, generator=g)
    mask = positions = None
    if kind == "normal":
        x = randn(B, S, I)
    elif kind == "silu":
        x = torch.nn.functional.silu(randn(B, S, I) * 2)
    elif kind == "ties":  # few distinct values: long runs of equal magnitudes
        x = torch.tensor([-1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0])[torch.randint(0, 7, (B, S, I), generator=g)]
    elif kind == "zeros":
        x = torch.where(randn(B, S, I) > 0, 0.0, -0.0)
    elif kind == "negative":
        x = -randn(B, S, I).abs() - 1e-3
    elif kind == "nonfinite":
        x = randn(B, S, I)
        special = torch.rand(B, S, I, generator=g)
        x[special < 0.02] = float("nan")
        x[(special >= 0.02) & (special < 0.03)] = float("inf")
        x[(special >= 0.03) & (special < 0.04)] = -float("inf")
    elif kind == "mask_bool":
        x = randn(B, S, I)
        mask = torch.rand(B, S, generator=g) > 0.3
        mask[-1, : max(1, S // 2)] = False  # left padding
        if B > 1:
            mask[0] = False  # a fully masked row
    elif kind == "mask_int64_positions":
        x = randn(B, S, I)
        mask = (torch.rand(B, S, generator=g) > 0.2).long()
        positions = torch.randint(-(2**40), 2**40, (B, S), generator=g)
    else:
        raise ValueError(kind)
    x = x.to(dtype).to(device)
    return x, (mask.to(device) if mask is not None else None), (positions.to(device) if positions is not None else None)


KINDS = ["normal", "silu", "ties", "zeros", "negative", "nonfinite", "mask_bool", "mask_int64_positions"]
CONFIGS = {
    "qwen2.5": PRESETS["qwen2.5"],
    "llama-3.1": PRESETS["llama-3.1"],
    "gemma-3": PRESETS["gemma-3"],
    "wide": ARMConfig(k=4.0, pmin=0.0, pmax=1.0, p1=0.0, seed=2**62 + 12345),
}
# Small and odd shapes: groups of up to 64 KiB take the row plan, larger ones hist16 (16-bit,
# at most 64 groups) or radix; parity_large adds 16-bit data in more than 64 large groups.
BENCH_SHAPES = [(1, 2048, 14336), (8, 2048, 14336)]  # Llama-3.1-8B MLP activations, bfloat16
DECODE_SHAPES = [(1, 1, 14336), (8, 1, 14336)]  # one decode step: the row plan
RADIX16_SHAPE = (66, 2, 16500)  # 66 groups of 33000: too large for the row plan, too many for hist16
SMALL_SHAPES = [(1, 1, 1), (1, 7, 3), (2, 3, 37), (3, 5, 129), (2, 64, 300), (4, 33, 1000), (70, 3, 50)]


def diagnose(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> str:
    """Where a mismatch comes from: the selection (which elements change) or the values (Qp, Mneg, u)."""
    differ = bits(got) != bits(want)
    moved_got, moved_want = bits(got) != bits(x), bits(want) != bits(x)
    i = tuple(differ.nonzero()[0].tolist())
    return (f"{int(differ.sum())} differ; moved {int(moved_got.sum())} vs {int(moved_want.sum())} expected, "
            f"{int((moved_got != moved_want).sum())} with a different moved/kept decision; first at {i}: "
            f"x={x[i].item()!r} got={got[i].item()!r} want={want[i].item()!r}")


def parity(kernel: CudaARM, seed: int, quick: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    failures, checked, moved = [], 0, 0
    shapes = SMALL_SHAPES[:4] if quick else SMALL_SHAPES
    for dtype in DTYPES:
        for scope in SCOPES:
            for shape in shapes:
                for k, kind in enumerate(KINDS):
                    cname = list(CONFIGS)[(k + len(shape) + shape[2]) % len(CONFIGS)]
                    config = CONFIGS[cname].replace(scope=scope, seed=int(torch.randint(0, 2**62, (1,), generator=g)))
                    x, mask, positions = make_inputs(kind, shape, dtype, g, DEVICE)
                    want = arm_reference(x.cpu(), None if mask is None else mask.cpu(),
                                         None if positions is None else positions.cpu(), config)
                    got = kernel(x, mask, positions, config).cpu()
                    checked += 1
                    moved += int((bits(got) != bits(x.cpu())).sum())
                    if not torch.equal(bits(got), bits(want)):
                        failures.append(f"{dtype} {scope} {list(shape)} {kind} {cname}: "
                                        + diagnose(x.cpu(), got, want))
        log(f"parity {dtype}: {checked} cases so far, {len(failures)} failing")
    # Misaligned pointers (an offset view) and in-place output.
    for dtype in DTYPES:
        base = torch.randn(1 + 4 * 9 * 64, generator=g).to(dtype).to(DEVICE)
        x = base[1:].view(4, 9, 64)  # 2 or 4 bytes past a 16-byte boundary
        config = PRESETS["llama-3.1"]
        want = arm_reference(x.cpu(), None, None, config)
        got = kernel(x, None, None, config).cpu()
        checked += 1
        if not torch.equal(bits(got), bits(want)):
            failures.append(f"{dtype} misaligned input: {(bits(got) != bits(want)).sum().item()} differ")
    return {"seed": seed, "cases": checked, "failures": failures, "elements_moved": moved}


def binding_check(seed: int) -> dict:
    """torch.ops.armquant.arm on CUDA tensors with ARMQUANT_ARM_BACKEND=native: the whole PyTorch
    path (custom op, armquant._native, this library) against the reference."""
    try:
        from armquant import _native
        from armquant.arm import arm
    except ImportError as e:
        return {"skipped": f"armquant._native is not in this checkout ({e})"}
    if os.environ.get("ARMQUANT_GPU_CHECK_STANDALONE"):
        return {"skipped": "the library was built with nvcc alone (CMake build unavailable or failed); "
                           "armquant._native needs the full libarmquant_ort.so"}
    try:
        found = _native.kernel(DEVICE)
    except (AttributeError, OSError) as e:  # a library without the full C ABI
        return {"skipped": f"armquant._native could not load {_native.library_path()}: {e}"}
    if found is None:
        return {"skipped": f"armquant._native found no CUDA kernel in {_native.library_path()}"}
    os.environ["ARMQUANT_ARM_BACKEND"] = "native"
    g = torch.Generator().manual_seed(seed)
    failures, checked = [], 0
    try:
        for dtype in DTYPES:
            for kind in ("silu", "mask_bool", "mask_int64_positions"):
                for cname, config in CONFIGS.items():
                    x, mask, positions = make_inputs(kind, (3, 17, 130), dtype, g, DEVICE)
                    got = arm(x, mask, positions, config).cpu()
                    want = arm_reference(x.cpu(), None if mask is None else mask.cpu(),
                                         None if positions is None else positions.cpu(), config)
                    checked += 1
                    if not torch.equal(bits(got), bits(want)):
                        failures.append(f"torch op {dtype} {kind} {cname}: {(bits(got) != bits(want)).sum().item()} differ")
    finally:
        os.environ.pop("ARMQUANT_ARM_BACKEND", None)
    return {"cases": checked, "failures": failures, "library": str(_native.library_path())}


def parity_large(kernel: CudaARM, seed: int, cases) -> dict:
    """Large inputs, (shape, dtype, name, config) each; the reference runs on the GPU (sorts) to keep it fast."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rows, failures = [], []
    for shape, dtype, name, config in cases:
        x = torch.nn.functional.silu(torch.randn(*shape, generator=g, device=DEVICE) * 2).to(dtype)
        want = arm_reference(x, None, None, config)
        got = kernel(x, None, None, config)
        bad = int((bits(got) != bits(want)).sum())
        moved = int((bits(got) != bits(x)).sum())
        rows.append({"shape": list(shape), "dtype": str(dtype), "config": name, "mismatches": bad, "moved": moved})
        if bad:
            failures.append(f"{dtype} {list(shape)} {name}: " + diagnose(x, got, want))
        log(f"parity {list(shape)} {dtype} {name}: {bad} mismatches, {moved} moved")
        del x, want, got
        torch.cuda.empty_cache()
    # The reference on the GPU must agree with the reference on the CPU (it defines the truth).
    x = torch.nn.functional.silu(torch.randn(2, 64, 512, generator=g, device=DEVICE) * 2).to(torch.bfloat16)
    same = torch.equal(bits(arm_reference(x, None, None, ARMConfig()).cpu()),
                       bits(arm_reference(x.cpu(), None, None, ARMConfig())))
    if not same:
        failures.append("arm_reference differs between CUDA and CPU")
    return {"rows": rows, "failures": failures, "reference_cuda_equals_cpu": same}


def graph_check(kernel: CudaARM) -> dict:
    """Capture the op in a CUDA graph, replay on new data, compare with the reference; each plan
    (row, hist16, radix) once."""
    failures = []
    for dtype, scope, shape in [(torch.bfloat16, "sequence", (2, 16, 384)), (torch.float32, "token", (2, 16, 384)),
                                (torch.float16, "tensor", (2, 16, 384)), (torch.bfloat16, "sequence", (2, 64, 1024)),
                                (torch.float32, "sequence", (2, 64, 1024))]:
        config = PRESETS["qwen2.5"].replace(scope=scope)
        x = torch.randn(*shape, device=DEVICE).to(dtype)
        mask = torch.ones(*shape[:2], dtype=torch.bool, device=DEVICE)
        y, args, keep = kernel.prepare(x, mask, None, config)
        static_x = keep[0]
        kernel.launch(args)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            kernel.launch(args)
        for trial in range(3):
            fresh = torch.randn(*shape, device=DEVICE).to(dtype)
            fresh[0, 0, :7] = 0.0
            static_x.copy_(fresh)
            mask[1, : trial * 3] = False
            graph.replay()
            torch.cuda.synchronize()
            want = arm_reference(fresh.cpu(), mask.cpu(), None, config)
            if not torch.equal(bits(y.cpu()), bits(want)):
                failures.append(f"graph replay {dtype} {scope} {list(shape)} trial {trial}: "
                                f"{(bits(y.cpu()) != bits(want)).sum().item()} differ")
    return {"failures": failures}


# --- timing ---------------------------------------------------------------------------------


def cuda_time_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_time_ms(fn, iters: int) -> float:
    """GPU time of fn captured `iters` times in one CUDA graph (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


TIMED_CONFIGS = {"qwen2.5 sequence": PRESETS["qwen2.5"], "llama-3.1 sequence": PRESETS["llama-3.1"],
                 "qwen2.5 token": PRESETS["qwen2.5"].replace(scope="token")}


def timing(kernel: CudaARM, shapes, quick: bool, baseline: CudaARM | None = None, hidden: int = 4096) -> list[dict]:
    """Llama-3.1-8B's MLP: hidden 4096, intermediate I (14336) = the ARM tensor's last dim.

    With a baseline kernel, new and baseline graphs are timed alternately (new, base, new, base)
    and each keeps its best, so that clock and thermal drift fall on both."""
    rows = []
    inter = shapes[0][2]
    w_gate = torch.randn(hidden, inter, device=DEVICE, dtype=torch.bfloat16) * 0.02
    w_up = torch.randn(hidden, inter, device=DEVICE, dtype=torch.bfloat16) * 0.02
    w_down = torch.randn(inter, hidden, device=DEVICE, dtype=torch.bfloat16) * 0.02
    iters = 5 if quick else 20
    for shape in shapes:
        B, S, I = shape
        x = torch.nn.functional.silu(torch.randn(*shape, device=DEVICE) * 2).to(torch.bfloat16)
        elementwise_out = torch.empty_like(x)
        elementwise = cuda_time_ms(lambda: torch.neg(x, out=elementwise_out), iters)
        h = torch.randn(B * S, hidden, device=DEVICE, dtype=torch.bfloat16)
        gate_out = torch.empty(B * S, inter, device=DEVICE, dtype=torch.bfloat16)
        up_out = torch.empty_like(gate_out)
        down_out = torch.empty(B * S, hidden, device=DEVICE, dtype=torch.bfloat16)

        def mlp():
            torch.matmul(h, w_gate, out=gate_out)
            torch.matmul(h, w_up, out=up_out)
            torch.matmul(gate_out, w_down, out=down_out)

        matmuls = cuda_time_ms(mlp, max(3, iters // 2))
        for name, config in TIMED_CONFIGS.items():
            y, args, keep = kernel.prepare(x, None, None, config)
            eager = cuda_time_ms(lambda: kernel.launch(args), iters)
            row = {"shape": list(shape), "op": f"ARM CUDA {name}", "eager_ms": eager,
                   "elementwise_ms": elementwise, "mlp_matmuls_ms": matmuls}
            if baseline is None:
                row["graph_ms"] = graph_time_ms(lambda: kernel.launch(args), iters)
            else:
                base_y, base_args, base_keep = baseline.prepare(x, None, None, config)
                new_times, base_times = [], []
                for _ in range(2):
                    new_times.append(graph_time_ms(lambda: kernel.launch(args), iters))
                    base_times.append(graph_time_ms(lambda: baseline.launch(base_args), iters))
                row["graph_ms"], row["baseline_graph_ms"] = min(new_times), min(base_times)
                row["baseline_output_equal"] = bool(torch.equal(bits(y), bits(base_y)))
                del base_y, base_args, base_keep
            rows.append(row)
            log(f"timing {list(shape)} {name}: eager {eager:.4f} ms, graph {row['graph_ms']:.4f} ms"
                + (f", baseline graph {row['baseline_graph_ms']:.4f} ms, outputs equal {row['baseline_output_equal']}"
                   if baseline is not None else ""))
            del y, args, keep
        # benchmarks/published_arm.py, with its Llama-3.1 settings (a host sync per call: wall time).
        reps = 1 if quick else 2
        published_arm(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            published_arm(x)
        torch.cuda.synchronize()
        published = (time.perf_counter() - t) * 1000 / reps
        log(f"timing {list(shape)} published port: {published:.1f} ms")
        for row in rows:
            if row["shape"] == list(shape):
                row["published_ms"] = published
        del x, h, gate_out, up_out, down_out, elementwise_out
        torch.cuda.empty_cache()
    return rows


def kernel_breakdown(kernel: CudaARM, shapes, label: str = "new") -> list[dict]:
    """GPU time per kernel of the op (torch.profiler / CUPTI), to show where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for shape in shapes:
        x = torch.nn.functional.silu(torch.randn(*shape, device=DEVICE) * 2).to(torch.bfloat16)
        _, args, keep = kernel.prepare(x, None, None, PRESETS["qwen2.5"])
        kernel.launch(args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                kernel.launch(args)
            torch.cuda.synchronize()
        for event in prof.key_averages():
            total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total:
                rows.append({"build": label, "shape": list(shape), "kernel": event.key[:60], "us_per_call": total / 5})
        del x, args, keep
    for r in rows:
        log(f"breakdown {label} {r['shape']} {r['kernel']}: {r['us_per_call']:.1f} us")
    return rows


# --- main -----------------------------------------------------------------------------------


def write_result(result: dict, out_dir: str | None) -> None:
    if out_dir:
        write_json(Path(out_dir) / "gpu_check.json", result)
        log(f"wrote {Path(out_dir) / 'gpu_check.json'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, help="shared library carrying armq_cuda_forward")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default $OUT)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 2**31, help="seed of the fresh random inputs")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument("--baseline-lib", help="an earlier build of the kernel to time side by side")
    parser.add_argument("--profile-workload", action="store_true",
                        help="only run each timed configuration once at the first benchmark shape, for a profiler "
                             "(gpu_check.sh --ncu runs this under Nsight Compute)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("ERROR: torch sees no CUDA device; this check needs a GPU", flush=True)
        return 2
    kernel = CudaARM(args.lib)
    if args.profile_workload:
        x = torch.nn.functional.silu(torch.randn(*BENCH_SHAPES[0], device=DEVICE) * 2).to(torch.bfloat16)
        for config in TIMED_CONFIGS.values():
            kernel(x, config=config)
        torch.cuda.synchronize()
        return 0
    baseline = CudaARM(args.baseline_lib) if args.baseline_lib else None
    result = {"provenance": provenance(), "torch_cuda": torch.version.cuda, "seed": args.seed, "library": args.lib,
              "baseline_library": args.baseline_lib}
    log(f"device {result['provenance']['gpu']}, torch {torch.__version__} (CUDA {torch.version.cuda}), seed {args.seed}")

    bench_shapes = BENCH_SHAPES[:1] if args.quick else BENCH_SHAPES
    timed_shapes = bench_shapes + (DECODE_SHAPES[1:] if args.quick else DECODE_SHAPES)
    large_configs = [("qwen2.5 sequence", PRESETS["qwen2.5"]), ("llama-3.1 token", PRESETS["llama-3.1"].replace(scope="token")),
                     ("gemma-3 tensor", PRESETS["gemma-3"].replace(scope="tensor"))]
    large_cases = [(shape, torch.bfloat16, name, config) for shape in bench_shapes for name, config in large_configs]
    large_cases += [  # the radix plan: float32 in large groups, and 16-bit data in more than 64 of them
        (BENCH_SHAPES[0], torch.float32, "qwen2.5 sequence", PRESETS["qwen2.5"]),
        (RADIX16_SHAPE, torch.bfloat16, "llama-3.1 sequence", PRESETS["llama-3.1"]),
    ]
    sections = [
        ("parity", True, lambda: parity(kernel, args.seed, args.quick)),
        ("binding", True, lambda: binding_check(args.seed + 2)),
        ("graph", True, lambda: graph_check(kernel)),
        ("parity_large", True, lambda: parity_large(kernel, args.seed + 1, large_cases)),
        ("timing", False, lambda: timing(kernel, timed_shapes, args.quick, baseline)),
        ("breakdown", False, lambda: kernel_breakdown(kernel, timed_shapes) + (
            kernel_breakdown(baseline, timed_shapes, "baseline") if baseline is not None else [])),
    ]
    ok = True
    for name, required, run in sections:  # required: counts towards the exit status
        log(f"--- {name}")
        try:
            result[name] = run()
        except Exception as e:  # noqa: BLE001 - report and carry on to the other sections
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{name} FAILED with {type(e).__name__}: {e}")
            ok = ok and not required
        torch.cuda.synchronize()
        write_result(result, args.out)
        if isinstance(result[name], dict) and result[name].get("failures"):
            ok = False
            for line in result[name]["failures"][:20]:
                log(f"FAIL {line}")

    print()
    print(f"ARM CUDA kernel check on {result['provenance']['gpu']} (seed {args.seed}, rev {result['provenance']['git_revision'][:10]})")
    p = result.get("parity", {})
    if "cases" in p:
        print(f"parity vs arm_reference (CPU), direct ctypes calls: {p['cases']} cases, {len(p['failures'])} failing")
    pl = result.get("parity_large", {})
    if "rows" in pl:
        print(f"parity at benchmark sizes (reference on GPU): {len(pl['rows'])} runs, {len(pl['failures'])} failing; "
              f"reference CUDA == CPU: {pl['reference_cuda_equals_cpu']}")
    b = result.get("binding", {})
    if "cases" in b:
        print(f"torch.ops.armquant.arm via armquant._native (ARMQUANT_ARM_BACKEND=native): {b['cases']} cases, "
              f"{len(b['failures'])} failing")
    elif "skipped" in b:
        print(f"torch.ops.armquant.arm via armquant._native: SKIPPED, {b['skipped']}")
    gr = result.get("graph", {})
    if "failures" in gr:
        print(f"CUDA graph capture and replay: {'ok' if not gr['failures'] else 'FAILING'}")
    rows = result.get("timing", [])
    if isinstance(rows, list) and rows:
        print("bfloat16 timing in ms (graph = replayed CUDA graph, GPU time only; eager includes launches)")
        base = baseline is not None
        print(f"{'shape':>16} {'op':<24} {'eager':>8} {'graph':>8} {'x elemwise':>10} {'published/':>10} {'% of MLP':>9}"
              + (f" {'new/base':>9}" if base else ""))
        print(f"{'':>16} {'':<24} {'':>8} {'':>8} {'(<= 3)':>10} {'(>= 50)':>10} {'(< 2)':>9}")
        for r in rows:
            print(f"{'x'.join(map(str, r['shape'])):>16} {r['op'][9:]:<24} {r['eager_ms']:8.4f} {r['graph_ms']:8.4f} "
                  f"{r['graph_ms'] / r['elementwise_ms']:10.2f} {r.get('published_ms', float('nan')) / r['eager_ms']:10.0f} "
                  f"{100 * r['graph_ms'] / r['mlp_matmuls_ms']:9.2f}"
                  + (f" {r['graph_ms'] / r['baseline_graph_ms']:9.2f}" if base else ""))
        if base:
            equal = all(r["baseline_output_equal"] for r in rows)
            print(f"baseline {args.baseline_lib}: outputs {'equal to' if equal else 'DIFFERENT from'} the new kernel's")
            ok = ok and equal
        for shape in sorted({tuple(r["shape"]) for r in rows}):
            r = next(r for r in rows if tuple(r["shape"]) == shape)
            print(f"{'x'.join(map(str, shape)):>16} baselines: elementwise {r['elementwise_ms']:.4f} ms, "
                  f"3 MLP matmuls {r['mlp_matmuls_ms']:.3f} ms, published port {r.get('published_ms', float('nan')):.1f} ms")
    for name in ("timing", "breakdown"):
        if isinstance(result.get(name), dict) and "error" in result[name]:
            print(f"{name}: ERROR {result[name]['error']}")
    print(f"RESULT: {'PASS' if ok else 'FAIL'} (parity and graph checks{', baseline output' if baseline else ''})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
