"""The CUDA kernels themselves, run on the CPU by a simulator, against the reference bit for bit.

tests and CI have no GPU. export/cuda/sim/cuda_sim.h runs arm_cuda.cu's kernels as written:
each block's threads are fibers that meet at __syncthreads and at the warp collectives, blocks
and threads run in shuffled orders, and cub's block scan and reduce are stood in for. The
source is compiled with the host compiler after two mechanical rewrites (kernel launches and
`extern __shared__` arrays), so indexing, chunking, tie offsets, shared-memory staging and
warp-level code are all exercised, including which plan (row, hist16 or radix) a shape gets.
One test runs them again under AddressSanitizer for out-of-bounds accesses. What the simulator
cannot check, races it happens to order away and speed, is left to benchmarks/gpu_check.sh on a
GPU; the last test here runs that script's checks against the simulated kernel.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from armquant.arm import PRESETS, ARMConfig, arm_reference
from armquant import _native
from armquant._native import KernelAttrs

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "export" / "cuda"
SIM_DIR = CUDA_DIR / "sim"
DTYPES = _native._DTYPES
KERNEL_LAUNCH = re.compile(r"((?:\w+::)*[A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(")
DYNAMIC_SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def build_for_simulator(source: Path, out_dir: Path, name: str, harness: str = "",
                        defines: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> Path:
    """Rewrites launches and dynamic shared arrays for cuda_sim.h and builds a shared library.

    `harness` is CUDA source appended to the file, to launch one of its kernels directly;
    `defines` are -D options, `flags` other compiler options."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip(f"no C++ compiler (g++) to build {source.name} for the CUDA simulator")
    text = KERNEL_LAUNCH.sub(r"::sim::Launch(\2)(\1, ", source.read_text() + harness)
    text = DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::sim::dynamic_shared());", text)
    assert "<<<" not in text and "extern __shared__" not in text, f"{source}: a construct the rewrite missed"
    rewritten = out_dir / f"{name}.cpp"
    rewritten.write_text(f'#line 1 "{source}"\n{text}')  # compiler messages point at the real file
    lib = out_dir / f"lib{name}.so"
    built = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", *flags, "-I", str(SIM_DIR / "include"),
         "-I", str(source.parent), "-include", str(SIM_DIR / "cuda_sim.h"), *(f"-D{d}" for d in defines),
         "-o", str(lib), str(rewritten)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"{source.name} does not build for the simulator:\n{built.stderr[-4000:]}"
    return lib


def load_simulator(path: Path) -> ctypes.CDLL:
    """A simulator build of arm_cuda.cu, with the C ABI's argument types."""
    lib = ctypes.CDLL(str(path))
    lib.armq_sim_error.restype = ctypes.c_char_p
    lib.armq_cuda_workspace_bytes.restype = ctypes.c_size_t
    lib.armq_cuda_workspace_bytes.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.armq_cuda_forward.argtypes = (
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
        + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
           ctypes.c_void_p])
    return lib


# k_tie_scan on its own: the ARM cases would need more than 256 chunks (8M elements) a group to
# reach its second iteration.
TIE_SCAN_HARNESS = """
extern "C" void sim_tie_scan(const uint32_t* ties, unsigned long long* offset, int64_t G, int64_t chunks,
                             const int* split) {
  std::vector<armq::GroupState> st(G);
  for (int64_t g = 0; g < G; ++g) {
    st[g] = armq::GroupState{};
    st[g].n = split[g] ? 1 : 0;  // takes_some_ties: n > 0 and need (0) < ties (1)
    st[g].ties = 1;
  }
  armq::k_tie_scan<<<(unsigned)G, armq::kThreads>>>(st.data(), ties, offset, chunks);
}
"""


# Each plan's limits, as built for the tests: the default (small groups take the row plan), no row
# plan (16-bit data in at most 64 groups takes hist16, the rest radix), and radix only.
PLAN_BUILDS = {
    "row": (),
    "hist16": ("ARMQ_ROW_MAX_BYTES=0",),
    "radix": ("ARMQ_ROW_MAX_BYTES=0", "ARMQ_MAX_GROUPS_HIST16=0"),
}


@pytest.fixture(scope="module")
def simulators(tmp_path_factory):
    """plan -> the library built with that plan's limits (built on first use)."""
    built = {}

    def get(plan: str) -> ctypes.CDLL:
        if plan not in built:
            built[plan] = load_simulator(build_for_simulator(
                CUDA_DIR / "arm_cuda.cu", tmp_path_factory.mktemp(f"sim_{plan}"), "arm_cuda_sim", TIE_SCAN_HARNESS,
                PLAN_BUILDS[plan]))
        return built[plan]

    return get


@pytest.fixture(scope="module")
def simulated(simulators):
    return simulators("row")


def simulate(lib, x, mask, positions, config):
    """armq_cuda_forward on CPU tensors, through the simulator; fails the test on any simulator error.

    The inputs are prepared as the PyTorch binding prepares them for the CUDA kernel."""
    x, mask, mask_type, positions, B, S, I = _native._prepare(x, mask, positions)
    y = torch.empty_like(x)
    attrs = KernelAttrs.of(config)
    dtype = DTYPES[x.dtype]
    nbytes = lib.armq_cuda_workspace_bytes(dtype, B, S, I, ctypes.byref(attrs))
    # Garbage, not zeros: the kernels must zero what they rely on.
    workspace = torch.full((max(nbytes, 1),), 0xA5, dtype=torch.uint8)
    lib.armq_sim_reset()
    rc = lib.armq_cuda_forward(
        dtype, x.data_ptr(), y.data_ptr(), B, S, I, _native._pointer(mask), mask_type, _native._pointer(positions),
        ctypes.byref(attrs), workspace.data_ptr(), nbytes, None)
    error = lib.armq_sim_error().decode()
    assert rc == 0 and not error, f"armq_cuda_forward returned {rc}: {error}"
    return y


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


def assert_bit_exact(lib, name, x, mask, positions, config):
    want = arm_reference(x, mask, positions, config)
    got = simulate(lib, x, mask, positions, config)
    mismatch = (bits(got) != bits(want)).sum().item()
    assert mismatch == 0, f"{name}, {config}: {mismatch} elements differ"
    return want


# float32 has no hist16 plan: its "hist16" build would run the radix plan again.
PLAN_DTYPES = [(plan, dtype) for plan in PLAN_BUILDS for dtype in DTYPES
               if not (plan == "hist16" and dtype == torch.float32)]


@pytest.mark.parametrize("scope", ["tensor", "sequence", "token"])
@pytest.mark.parametrize("plan,dtype", PLAN_DTYPES, ids=[f"{p}-{str(d).removeprefix('torch.')}" for p, d in PLAN_DTYPES])
def test_kernels_match_reference(simulators, plan, dtype, scope):
    lib = simulators(plan)
    for c, config in enumerate(CONFIGS):
        config = config.replace(scope=scope)
        for name, x, mask, positions in cases(dtype, seed=c):
            assert_bit_exact(lib, name, x, mask, positions, config)


def tie_heavy(shape, generator):
    """Values on a few levels: the threshold falls inside a class of ties almost surely."""
    levels = torch.tensor([-2.0, -0.5, -0.25, 0.25, 0.5, 1.0, 3.0])
    return levels[torch.randint(0, len(levels), shape, generator=generator)]


# Shapes past one block, in the default build: several hist16 chunks a group (more than 57344
# elements), persistent hist16 blocks that take several chunks (the simulator reports 2 SMs),
# several output chunks a group (more than 32768) with the threshold's ties split across chunks,
# unaligned groups (length not a multiple of the vector width), more than 64 groups (16-bit data
# then takes the radix plan), and row-plan groups of the largest size, ties split across threads.
LARGE = [
    ("hist16, 2 blocks, 3 chunks, unaligned, ties", "row", torch.bfloat16, (1, 7, 10007), "sequence", True),
    ("hist16, 6 chunks on the simulator's 2 SMs, across groups", "row", torch.bfloat16, (2, 6, 24001), "sequence",
     False),
    ("hist16, 2 chunks a group, aligned", "row", torch.float16, (2, 5, 8192), "sequence", False),
    ("hist16, a block's chunks span groups", "row", torch.bfloat16, (3, 2, 20000), "sequence", False),
    ("hist16, one value: a bin past 16 bits", "row", torch.bfloat16, (1, 8, 24000), "tensor", "constant"),
    ("radix float32, 3 chunks, ties", "row", torch.float32, (1, 3, 30001), "tensor", True),
    ("radix float16, 80 token groups", "hist16", torch.float16, (2, 40, 9), "token", False),
    ("radix bfloat16, 100 token groups, ties", "hist16", torch.bfloat16, (1, 100, 700), "token", True),
    ("row bfloat16, 2 groups of 32768, ties", "row", torch.bfloat16, (2, 4, 8192), "sequence", True),
    ("row float32, 1 group of 16384 over 4 tokens", "row", torch.float32, (1, 4, 4096), "tensor", False),
    ("row bfloat16, 100 token groups, ties", "row", torch.bfloat16, (1, 100, 700), "token", True),
]


def large_input(dtype, shape, ties) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    if ties == "constant":  # 192000 copies of one value: 48000 a block on each of the 2 SMs
        x = torch.full(shape, 0.75)
    elif ties:
        x = tie_heavy(shape, g)
    else:
        x = torch.nn.functional.silu(torch.randn(*shape, generator=g) * 2)
    return x.to(dtype)


@pytest.mark.parametrize("name,plan,dtype,shape,scope,ties", LARGE, ids=[case[0] for case in LARGE])
def test_kernels_match_reference_past_one_block(simulators, name, plan, dtype, shape, scope, ties):
    x = large_input(dtype, shape, ties)
    config = PRESETS["llama-3.1"].replace(scope=scope)
    want = assert_bit_exact(simulators(plan), name, x, None, None, config)
    if ties is True:  # the case must split the threshold's ties, or it would not test the tie ranking
        a = x.float().abs().reshape(-1, x.shape[-1] if scope == "token" else x[0].numel())
        moved = (bits(want) != bits(x)).reshape(a.shape)
        split = [(moved[g][a[g] == a[g][moved[g]].max()]) for g in range(a.shape[0]) if moved[g].any()]
        assert any(m.any() and not m.all() for m in split)


def test_tie_scan_over_many_chunks(simulated):
    G, chunks = 3, 600
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 5000, size=(G, chunks), dtype=np.uint32)
    split = np.array([1, 0, 1], dtype=np.int32)
    offset = np.full((G, chunks), 7, dtype=np.uint64)
    simulated.armq_sim_reset()
    simulated.sim_tie_scan(ties.ctypes.data_as(ctypes.c_void_p), offset.ctypes.data_as(ctypes.c_void_p),
                           ctypes.c_int64(G), ctypes.c_int64(chunks), split.ctypes.data_as(ctypes.c_void_p))
    assert simulated.armq_sim_error() == b""
    exclusive = np.cumsum(ties, axis=1, dtype=np.uint64) - ties
    np.testing.assert_array_equal(offset[0], exclusive[0])
    np.testing.assert_array_equal(offset[2], exclusive[2])
    assert (offset[1] == 7).all()  # a group that takes all or none of its ties needs no offsets


def test_kernels_change_values(simulated):
    # Guard against a vacuous pass: the op must move some elements on ordinary input.
    x = torch.randn(2, 4, 64).to(torch.bfloat16)
    y = simulate(simulated, x, None, None, PRESETS["llama-3.1"])
    assert (bits(y) != bits(x)).sum().item() > 0


def test_philox_known_answer_through_uniform(simulated):
    # The spec's first known answer (counter 0, key 0) gives u = (0x6627e8d5 >> 8) * 2^-24 for
    # channel 0, position 0, seed 0; a selected positive element becomes u * Qp. With N = 1 the
    # element is selected and Qp is the element itself.
    x = torch.tensor([[[3.0]]])
    y = simulate(simulated, x, None, None, ARMConfig())
    u = np.float32((0x6627E8D5 >> 8) * 2.0**-24)
    assert y.item() == float(np.float32(u * np.float32(3.0)))


# Run in a subprocess with AddressSanitizer preloaded: every plan over the edge cases with one
# preset, and the large cases.
SANITIZED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_arm_cuda_sim import DTYPES, LARGE, PRESETS, assert_bit_exact, cases, large_input, load_simulator
libs = {{plan: load_simulator(Path(path)) for plan, path in {paths!r}.items()}}
for plan, lib in libs.items():
    for dtype in DTYPES:
        for scope in ("tensor", "sequence", "token"):
            for name, x, mask, positions in cases(dtype, seed=1):
                assert_bit_exact(lib, name, x, mask, positions, PRESETS["llama-3.1"].replace(scope=scope))
for name, plan, dtype, shape, scope, ties in LARGE:
    x = large_input(dtype, shape, ties)
    assert_bit_exact(libs[plan], name, x, None, None, PRESETS["llama-3.1"].replace(scope=scope))
print("no memory errors")
"""


def test_kernels_make_no_out_of_bounds_access(tmp_path):
    # AddressSanitizer watches the kernels' accesses to the input, output, mask, positions,
    # workspace and dynamic shared memory (not the static __shared__ arrays, which live in a
    # section of their own). Tails, chunk edges and unaligned groups are where such bugs hide.
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the simulator")
    libasan = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(libasan).is_absolute() or not Path(libasan).exists():
        pytest.skip(f"{compiler} has no AddressSanitizer runtime (libasan.so)")
    paths = {plan: str(build_for_simulator(CUDA_DIR / "arm_cuda.cu", tmp_path, f"arm_cuda_asan_{plan}",
                                           defines=PLAN_BUILDS[plan],
                                           flags=("-fsanitize=address", "-fno-omit-frame-pointer")))
             for plan in PLAN_BUILDS}
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0"}
    run = subprocess.run([sys.executable, "-c", SANITIZED_RUN.format(tests=str(ROOT / "tests"), paths=paths)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "no memory errors" in run.stdout, run.stderr[-6000:]


# The simulator must be able to fail: kernels with the mistakes it exists to catch.
FAULTY_KERNELS = r"""
__global__ void rotate(int* out, int sync) {
  __shared__ int v[256];
  int t = threadIdx.x;
  v[t] = t;
  if (sync) __syncthreads();
  out[t] = v[(t + 1) % 256];
}
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 100) __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void divergent_shuffle(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  out[threadIdx.x] = v;
}
extern "C" void run_rotate(int* out, int sync) { rotate<<<1, 256>>>(out, sync); }
extern "C" void run_divergent_barrier(int* out) { divergent_barrier<<<1, 256>>>(out); }
extern "C" void run_divergent_shuffle(int* out) { divergent_shuffle<<<1, 64>>>(out); }
"""


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sim_faulty")
    source = out_dir / "faulty.cu"
    source.write_text(FAULTY_KERNELS)
    lib = ctypes.CDLL(str(build_for_simulator(source, out_dir, "faulty")))
    lib.armq_sim_error.restype = ctypes.c_char_p
    return lib


def test_simulator_catches_a_missing_barrier(faulty):
    out = np.zeros(256, dtype=np.int32)
    for sync in (1, 0):
        faulty.armq_sim_reset()
        out[:] = -1
        faulty.run_rotate(out.ctypes.data_as(ctypes.c_void_p), sync)
        assert faulty.armq_sim_error() == b""
        right = (out == (np.arange(256) + 1) % 256).all()
        assert right == bool(sync), "with the barrier the rotation is exact; without it some thread reads early"


@pytest.mark.parametrize("kernel,message", [
    ("run_divergent_barrier", "divergent code"), ("run_divergent_shuffle", "warp collective")])
def test_simulator_reports_divergent_collectives(faulty, kernel, message):
    out = np.zeros(256, dtype=np.int32)
    faulty.armq_sim_reset()
    getattr(faulty, kernel)(out.ctypes.data_as(ctypes.c_void_p))
    assert message in faulty.armq_sim_error().decode()


def test_gpu_check_script_runs_on_the_simulated_kernel(simulators, monkeypatch, capsys):
    # benchmarks/gpu_check.py's parity, large-parity, binding and timing sections with a baseline,
    # and its summary, driven end to end on CPU tensors through the simulated kernel, so that a
    # mistake in the script does not cost a GPU session. CUDA-only parts are stood in for: events,
    # graphs and timing (the numbers mean nothing here), graph capture and the profiler breakdown.
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_check, "BENCH_SHAPES", [(1, 8, 9000)])  # hist16 in bfloat16, radix in float32
    monkeypatch.setattr(gpu_check, "DECODE_SHAPES", [(1, 1, 1024), (2, 1, 1024)])
    monkeypatch.setattr(gpu_check, "SMALL_SHAPES", [(1, 1, 1), (2, 3, 37)])
    monkeypatch.setattr(gpu_check, "KINDS", ["silu", "ties", "mask_int64_positions"])
    monkeypatch.setattr(gpu_check, "RADIX16_SHAPE", (66, 1, 40))
    monkeypatch.setattr(gpu_check, "published_arm", lambda x: None)
    monkeypatch.setattr(gpu_check, "cuda_time_ms", lambda fn, iters, warmup=0: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu_check, "graph_time_ms", lambda fn, iters: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu_check, "graph_check", lambda kernel: {"failures": []})
    monkeypatch.setattr(gpu_check, "kernel_breakdown", lambda kernel, shapes, label="new": [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "simulated")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: type("Stream", (), {"cuda_stream": 0})())
    lib = simulators("row")._name
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--lib", lib, "--baseline-lib", lib, "--quick", "--seed", "5"])
    rc = gpu_check.main()
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "RESULT: PASS" in out and "new/base" in out and "outputs equal to the new kernel's" in out
