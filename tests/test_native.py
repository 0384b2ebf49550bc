"""The native CPU kernel against the reference, bit for bit (docs/arm-op-spec.md)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armquant import _native
from armquant.arm import PRESETS, ARMConfig, arm, arm_reference

pytestmark = pytest.mark.skipif(
    _native.kernel("cpu") is None,
    reason="libarmquant_ort.so is not built (python -m armquant._native --build)",
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCOPES = ("tensor", "sequence", "token")
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def native(x, mask=None, positions=None, config=ARMConfig()):
    return _native.kernel("cpu")(x, mask, positions, config)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])
    differ = (a != e).nonzero()
    assert differ.numel() == 0, (
        f"{differ.shape[0]} of {a.numel()} elements differ, first at {differ[0].tolist()}: "
        f"native {actual[tuple(differ[0])].item()!r} vs reference {expected[tuple(differ[0])].item()!r}"
    )


def check(x, mask=None, positions=None, config=ARMConfig()):
    assert_same_bits(native(x, mask, positions, config), arm_reference(x, mask, positions, config))


# --- data with the awkward cases the spec pins down --------------------------------------


def data(kind: str, shape, dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if kind == "all_equal":
        x = torch.full(shape, 0.7)
    elif kind == "ties":  # few distinct values: ties at every order statistic
        x = torch.round(x * 3) / 4
    elif kind == "zeros":  # +0.0 and -0.0 mixed in
        x = torch.where(torch.rand(shape, generator=gen) < 0.4, 0.0, x)
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, -x, x)
    elif kind == "negative":
        x = -x.abs() - 0.01
    elif kind == "nonfinite":
        r = torch.rand(shape, generator=gen)
        x = torch.where(r < 0.05, float("nan"), x)
        x = torch.where((r >= 0.05) & (r < 0.08), float("inf"), x)
        x = torch.where((r >= 0.08) & (r < 0.1), float("-inf"), x)
    elif kind == "wide":  # magnitudes across many octaves, subnormals included
        x = x * torch.exp2(torch.randint(-30, 30, shape, generator=gen).float())
    return x.to(dtype)


KINDS = ("normal", "all_equal", "ties", "zeros", "negative", "nonfinite", "wide")
SHAPES = ((1, 1, 1), (1, 1, 7), (2, 3, 5), (3, 7, 33), (2, 5, 257))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("kind", KINDS)
def test_parity_small_groups(dtype, scope, kind):
    gen = torch.Generator().manual_seed(hash((str(dtype), scope, kind)) % 2**31)
    for shape in SHAPES:
        x = data(kind, shape, dtype, gen)
        for config in (ARMConfig(scope=scope), PRESETS["llama-3.1"].replace(scope=scope),
                       PRESETS["gemma-3"].replace(scope=scope, seed=2**40 + 3)):
            check(x, config=config)
        mask = torch.rand(shape[:2], generator=gen) < 0.7
        mask[0] = False  # one fully masked row
        positions = torch.randint(0, 2**40, shape[:2], generator=gen)
        check(x, mask, positions, ARMConfig(scope=scope))
        check(x, mask.long(), positions, ARMConfig(scope=scope, percentile_of="abs"))


# Groups of at least 2**17 elements take the histogram path (float32 and float16 ones of 2**20
# or more try a sample first; see below).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ("normal", "ties", "zeros", "nonfinite", "wide", "negative"))
def test_parity_large_groups(dtype, kind):
    gen = torch.Generator().manual_seed(7)
    x = data(kind, (2, 3, 50_000), dtype, gen)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    positions = torch.randint(-(2**40), 2**40, (2, 3), generator=gen)
    for config in (ARMConfig(), ARMConfig(scope="tensor", percentile_of="abs"), PRESETS["llama-3.1"],
                   ARMConfig(share="fixed", c=0.3, p1=0.0), ARMConfig(p1=100.0, pmin=0.0, pmax=1.0, k=20.0)):
        check(x, mask, positions, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_mid_size_groups(dtype):
    # Groups of 2^15 to 2^17 elements take the large-group path where they would leave threads
    # idle (one prompt in scope sequence) and the small-group path where they keep every
    # thread busy (two prompts on two threads).
    gen = torch.Generator().manual_seed(37)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for kind in ("normal", "ties", "zeros", "nonfinite"):
            for shape in ((1, 40, 1536), (2, 40, 1536)):
                x = data(kind, shape, dtype, gen)
                mask = torch.rand(shape[:2], generator=gen) < 0.9
                positions = torch.randint(0, 2**40, shape[:2], generator=gen)
                check(x, mask, positions, ARMConfig(seed=3))
                check(x, None, None, PRESETS["llama-3.1"])
    finally:
        torch.set_num_threads(previous)


def test_parity_large_group_many_values_near_eps():
    # kappa = c = 1 puts eps on the MAD, a value that many elements share: the kernel must
    # count a < eps again instead of keeping them.
    gen = torch.Generator().manual_seed(3)
    x = data("ties", (1, 4, 60_000), torch.float32, gen)
    check(x, config=ARMConfig(kappa=1.0, c=1.0, scope="tensor"))


def test_parity_large_group_all_equal():
    # Every element in the threshold's histogram bin: the kernel takes the extra-pass route.
    x = torch.full((1, 1, 2_200_000), -1.25)
    x[0, 0, ::3] = 1.25
    check(x, config=ARMConfig(scope="tensor"))


# float32 and float16 groups of at least 2**20 elements first bracket their statistics from a
# sample and count against the brackets (float16 as its values' float32 bits); the histogram
# path runs when a bracket misses.
SAMPLED_SHAPE = (1, 8, 131_072)
SAMPLED_DTYPES = (torch.float32, torch.float16)
SAMPLED_CONFIGS = (ARMConfig(), ARMConfig(scope="tensor", percentile_of="abs"), PRESETS["llama-3.1"],
                   PRESETS["gemma-3"], ARMConfig(share="fixed", c=0.3, p1=0.0),
                   ARMConfig(p1=100.0, pmin=0.0, pmax=1.0, k=20.0))


@pytest.mark.parametrize("dtype", SAMPLED_DTYPES, ids=str)
@pytest.mark.parametrize("margin", ("1", "0"), ids=("sampled", "brackets_at_the_edge"))
@pytest.mark.parametrize("kind", ("normal", "ties", "zeros", "nonfinite", "wide", "negative", "all_equal"))
def test_parity_sampled_groups(kind, margin, dtype, monkeypatch):
    # Margin 0 shrinks the brackets to the sample's own bins: most miss, and the rest are
    # exact only just.
    monkeypatch.setenv("ARMQUANT_SAMPLE_MARGIN", margin)
    gen = torch.Generator().manual_seed(17)
    x = data(kind, SAMPLED_SHAPE, dtype, gen)
    mask = torch.ones(SAMPLED_SHAPE[:2], dtype=torch.bool)
    mask[0, 2] = False
    positions = torch.randint(0, 2**40, SAMPLED_SHAPE[:2], generator=gen)
    for config in SAMPLED_CONFIGS:
        check(x, mask, positions, config)


def test_parity_sampled_group_with_channel_structure():
    # Activations differ by channel and a few tokens are huge: the sample must see all
    # channels whatever the stride between its runs.
    gen = torch.Generator().manual_seed(19)
    scale = torch.exp2(torch.randint(-4, 5, (1536,), generator=gen).float())
    x = torch.nn.functional.silu(torch.randn(1, 1024, 1536, generator=gen) * scale)
    x[0, ::97] *= 300.0
    for config in SAMPLED_CONFIGS[:4]:
        check(x, config=config)


@pytest.mark.parametrize("dtype", SAMPLED_DTYPES, ids=str)
def test_parity_sampled_group_with_odd_rows(dtype):
    # Rows of an odd length: with a mask the counting pass runs one token at a time, so every
    # row ends in a scalar tail (of the widening too); masked rows are left out of it.
    gen = torch.Generator().manual_seed(29)
    x = data("ties", (1, 11, 95_329), dtype, gen)
    # Each row's most negative value in its last element, inside the tails: Mneg comes from there.
    x[0, :, -1] = -torch.arange(40, 51, dtype=torch.float32).to(dtype)
    x[0, :, -2] = torch.arange(30, 41, dtype=torch.float32).to(dtype)
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 4] = False
    positions = torch.randint(0, 2**40, (1, 11), generator=gen)
    for config in SAMPLED_CONFIGS[:3]:
        check(x, mask, positions, config)


@pytest.mark.parametrize("dtype", SAMPLED_DTYPES, ids=str)
def test_parity_sampled_group_across_many_octaves(dtype, monkeypatch):
    # Log-normal scales spread the brackets over a dozen octaves (fewer in float16, which has
    # no more): the counting pass compares coarse byte keys (a grid step of 8 or 16 bins) and
    # widens every bracket to that grid.
    # Strict: the brackets hold, so the counting pass alone must resolve every statistic.
    monkeypatch.setenv("ARMQUANT_SAMPLE_STRICT", "1")
    gen = torch.Generator().manual_seed(5)
    spread = 3.0 if dtype == torch.float32 else 1.5
    x = torch.randn(SAMPLED_SHAPE, generator=gen) * torch.exp(spread * torch.randn(SAMPLED_SHAPE, generator=gen))
    x = x.to(dtype)
    for config in SAMPLED_CONFIGS[:5] + (ARMConfig(c=0.002, p1=99.9, percentile_of="abs"),):
        check(x, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_large_group_with_more_threads_than_cores(dtype):
    # Passes take blocks as threads come free: with 5 threads on a 2-CPU machine the blocks
    # fall to the threads in an order that changes from run to run, and the output may not.
    gen = torch.Generator().manual_seed(31)
    x = data("ties", SAMPLED_SHAPE, dtype, gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(5)
        for config in (ARMConfig(), PRESETS["llama-3.1"]):
            check(x, config=config)
    finally:
        torch.set_num_threads(previous)


# Configurations whose statistics the sample brackets on ordinary data: p1 = 0 or 100, the
# group's minimum or maximum, lies beyond any bracket and falls back by design.
BRACKETED_CONFIGS = tuple(c for c in SAMPLED_CONFIGS if 0 < c.p1 < 100)


@pytest.mark.parametrize("dtype", SAMPLED_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ("normal", "ties", "negative"))
def test_sampled_statistics_hold_without_fallback(kind, dtype, monkeypatch):
    # A miscount in the counting pass sends a group to the histogram path, which hides it: the
    # output stays right. ARMQUANT_SAMPLE_STRICT turns that fallback into an error, so these
    # ordinary data must be resolved from the counting pass alone.
    monkeypatch.setenv("ARMQUANT_SAMPLE_STRICT", "1")
    gen = torch.Generator().manual_seed(17)
    x = data(kind, SAMPLED_SHAPE, dtype, gen)
    mask = torch.ones(SAMPLED_SHAPE[:2], dtype=torch.bool)
    mask[0, 2] = False
    for config in BRACKETED_CONFIGS:
        check(x, mask, None, config)


@pytest.mark.parametrize("dtype", SAMPLED_DTYPES, ids=str)
def test_sampled_and_histogram_paths_agree(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(23)
    x = (data("normal", SAMPLED_SHAPE, torch.float32, gen) * 0.01).to(dtype)
    sampled = native(x, config=ARMConfig(seed=9))
    monkeypatch.setenv("ARMQUANT_DISABLE_SAMPLING", "1")
    assert_same_bits(sampled, native(x, config=ARMConfig(seed=9)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_long_tokens_one_thread(dtype):
    # Tokens of millions of elements (hundreds of selection stretches each), 9.6 MB on one thread.
    gen = torch.Generator().manual_seed(11)
    x = data("normal", (1, 4, 600_000 * 4 // dtype.itemsize), dtype, gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        check(x, config=ARMConfig(scope="tensor", seed=5))
    finally:
        torch.set_num_threads(previous)


_VECTOR_PATH_CHECK = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from armquant import _native
from test_native import BRACKETED_CONFIGS, DTYPES, PRESETS, SAMPLED_DTYPES, ARMConfig, check, data
assert _native.cpu_isa() == {isa!r}, _native.cpu_isa()
gen = torch.Generator().manual_seed(13)
for dtype in DTYPES:
    for kind in ("normal", "ties", "nonfinite"):
        # odd lengths, so that every vector loop ends in a tail
        for shape, scope in (((2, 3, 50_001), "sequence"), ((3, 7, 333), "token"), ((1, 2, 70_003), "tensor"),
                             ((1, 1, 17), "sequence")):
            x = data(kind, shape, dtype, gen)
            mask = torch.rand(shape[:2], generator=gen) < 0.8
            check(x, mask, None, ARMConfig(scope=scope, seed=7))
            check(x, None, None, PRESETS["llama-3.1"].replace(scope=scope))
# groups resolved from the sample's brackets, where a fallback would hide a miscount
os.environ["ARMQUANT_SAMPLE_STRICT"] = "1"
for dtype in SAMPLED_DTYPES:
    for kind in ("normal", "ties", "negative"):
        x = data(kind, (1, 9, 131_071), dtype, gen)
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        mask[0, 3] = False
        for config in BRACKETED_CONFIGS:
            check(x, mask, None, config)
print("vector paths match")
"""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _best_isa(flags: set) -> str:
    if {"avx2", "f16c"} <= flags:
        return "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2"
    return "portable"


def test_cpu_isa_is_the_best_this_cpu_has():
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert _native.cpu_isa() == _best_isa(flags)


@pytest.mark.parametrize("disable, isa", (("ARMQUANT_DISABLE_AVX2", "portable"), ("ARMQUANT_DISABLE_AVX512", "avx2")),
                         ids=("portable", "avx2"))
def test_parity_of_each_vector_path(disable, isa):
    # The vector paths are chosen at run time and the default run takes the best; the others
    # must give the same bits. Each runs in a process of its own, as the choice is made once.
    import os
    import subprocess
    import sys
    from pathlib import Path

    if isa == "avx2" and _best_isa(_cpu_flags()) != "avx512":
        pytest.skip("this CPU has no AVX-512: the other tests already ran the AVX2 paths")
    env = dict(os.environ, **{disable: "1"})
    code = _VECTOR_PATH_CHECK.format(tests=str(Path(__file__).parent), isa=isa)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vector paths match" in run.stdout


def test_cpu_kernel_makes_no_out_of_bounds_access(tmp_path):
    # The vector loops load and store whole registers, up to a row's end and into the slack
    # their buffers reserve: AddressSanitizer checks every path's accesses, on a build of
    # export/ made for it, over the data of test_parity_of_each_vector_path.
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    compiler, cmake = shutil.which("g++"), shutil.which("cmake")
    if compiler is None or cmake is None:
        pytest.skip("needs g++ and cmake to build the kernel with AddressSanitizer")
    libasan = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(libasan).is_absolute() or not Path(libasan).exists():
        pytest.skip(f"{compiler} has no AddressSanitizer runtime (libasan.so)")
    root = Path(__file__).resolve().parent.parent
    flags = "-fsanitize=address -fno-omit-frame-pointer"
    for step in ([cmake, "-S", str(root / "export"), "-B", str(tmp_path), "-DARMQ_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release",
                  f"-DCMAKE_CXX_FLAGS={flags}", "-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address"],
                 [cmake, "--build", str(tmp_path), "-j2"]):
        built = subprocess.run(step, capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    best = _best_isa(_cpu_flags())
    paths = {"avx512": ["avx512", "avx2", "portable"], "avx2": ["avx2", "portable"]}.get(best, ["portable"])
    disable = {"avx512": {}, "avx2": {"ARMQUANT_DISABLE_AVX512": "1"}, "portable": {"ARMQUANT_DISABLE_AVX2": "1"}}
    for isa in paths:
        env = {**os.environ, **disable[isa], "ARMQUANT_LIBRARY": str(tmp_path / "libarmquant_ort.so"),
               "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0"}
        code = _VECTOR_PATH_CHECK.format(tests=str(Path(__file__).parent), isa=isa)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0 and "vector paths match" in run.stdout, f"{isa} paths:\n" + run.stderr[-6000:]


def test_empty_and_degenerate_shapes():
    for shape in ((1, 0, 4), (0, 3, 4), (2, 3, 0)):
        x = torch.randn(shape)
        assert native(x).shape == x.shape
    x = torch.randn(4, 9)  # rank 2 means B = 1
    check(x, torch.tensor([1, 1, 0, 1]), torch.arange(4) + 100)
    check(x, torch.tensor([[1, 1, 0, 1]]))
    check(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))  # nothing valid


def test_noncontiguous_input():
    x = torch.randn(3, 8, 6).transpose(0, 1)
    check(x)


def test_philox_known_answers():
    # The spec's table.
    assert _native.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _native.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _native.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_thread_count_does_not_change_the_result():
    x = torch.randn(2, 4, 40_000)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native(x, config=ARMConfig(scope="tensor"))
        torch.set_num_threads(max(2, previous))
        many = native(x, config=ARMConfig(scope="tensor"))
    finally:
        torch.set_num_threads(previous)
    assert_same_bits(one, many)


@pytest.mark.parametrize("scope", SCOPES)
def test_parity_with_two_threads(scope):
    # Enough groups or elements that the kernel spreads the work over its threads.
    x = data("normal", (2, 64, 1536), torch.float32, torch.Generator().manual_seed(17))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(2):  # the second call reuses the scratch the first left behind
            check(x, config=ARMConfig(scope=scope))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_writes_into_a_given_output(device):
    if device == "cuda" and (not torch.cuda.is_available() or _native.kernel("cuda") is None):
        pytest.skip("no CUDA device, or a library built without the CUDA kernel")
    x = data("normal", (2, 64, 1536), torch.float32, torch.Generator().manual_seed(5))
    out = torch.full_like(x, float("nan"), device=device)  # every element must be written
    got = _native.kernel(device)(x.to(device), None, None, ARMConfig(), out=out)
    assert got is out
    assert_same_bits(out.cpu(), arm_reference(x, config=ARMConfig()))


@pytest.mark.parametrize("bad, words", [
    (lambda x: torch.empty(2, 64, 1535), "got torch.float32 [2, 64, 1535]"),
    (lambda x: torch.empty(2, 64, 1536, dtype=torch.float16), "torch.float16"),
    (lambda x: torch.empty(2, 1536, 64).transpose(1, 2), "not contiguous"),
    (lambda x: x, "shares memory with X"),
    (lambda x: torch.as_strided(x, x.shape, x.stride(), x.storage_offset() + 64 * 1536), "shares memory with X"),
], ids=["shape", "dtype", "strides", "x_itself", "overlapping_x"])
def test_cpu_kernel_rejects_an_output_unlike_x(bad, words):
    x = torch.randn(3, 64, 1536)[:2]  # with room after it for an overlapping output
    with pytest.raises(ValueError, match=re.escape(words)):
        _native.kernel("cpu")(x, None, None, ARMConfig(), out=bad(x))


def test_torch_op_uses_native_kernel_when_forced(monkeypatch):
    x = torch.randn(2, 5, 64)
    monkeypatch.setenv("ARMQUANT_ARM_BACKEND", "native")
    got = arm(x, config=PRESETS["llama-3.1"])
    monkeypatch.setenv("ARMQUANT_ARM_BACKEND", "reference")
    want = arm(x, config=PRESETS["llama-3.1"])
    assert_same_bits(got, want)
    assert not torch.equal(got, x)  # ARM changed something


def test_forcing_native_without_a_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ARMQUANT_ARM_BACKEND", "native")
    monkeypatch.setattr(_native, "kernel", lambda device_type: None)
    with pytest.raises(RuntimeError, match="no native ARM kernel is built"):
        arm(torch.randn(1, 2, 4))


def test_bad_inputs_raise_before_the_kernel():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        native(torch.randn(1, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        native(torch.randn(2, 4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        native(torch.randn(1, 2, 4), torch.ones(1, 2))


def test_build_without_cmake_says_how_to_fix(monkeypatch, tmp_path):
    from armquant import _build

    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="cmake was not found"):
        _build.build(destination=tmp_path)


# --- fuzz ----------------------------------------------------------------------------------

_specials = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), float("-inf"), 1e-40, 6e4])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3), S=st.integers(1, 4), I=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES), scope=st.sampled_from(SCOPES),
    share=st.sampled_from(["mad", "fixed"]), percentile_of=st.sampled_from(["signed", "abs"]),
    c=st.floats(0, 1.5), p1=st.floats(0, 100), k=st.floats(0, 4), pmin=st.floats(0, 1), pmax=st.floats(0, 1),
    kappa=st.floats(0, 3), seed=st.integers(0, 2**63 - 1), use_mask=st.booleans(), data_seed=st.integers(0, 2**31),
    values=st.lists(_specials, max_size=6), levels=st.integers(0, 8),
)
def test_fuzz_parity(B, S, I, dtype, scope, share, percentile_of, c, p1, k, pmin, pmax, kappa, seed, use_mask,
                     data_seed, values, levels):
    pmin, pmax = min(pmin, pmax), max(pmin, pmax)
    config = ARMConfig(c=c, p1=p1, k=k, pmin=pmin, pmax=pmax, kappa=kappa, share=share,
                       percentile_of=percentile_of, scope=scope, seed=seed)
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(B, S, I, generator=gen)
    if levels:  # coarse grid: many ties
        x = torch.round(x * levels) / levels
    flat = x.view(-1)
    for j, v in enumerate(values):
        flat[(j * 7919) % flat.numel()] = v
    x = x.to(dtype)
    mask = (torch.rand(B, S, generator=gen) < 0.8) if use_mask else None
    positions = torch.randint(0, 2**34, (B, S), generator=gen)
    check(x, mask, positions, config)


# Large groups resolve every statistic from a histogram and the exact values of a few bins (or,
# float32 and float16 from 2**20 elements, from a sample's brackets); the shapes of the data decide which
# bins those are, so vary the data's shape more than its size.
_LARGE_FUZZ = dict(
    scope=st.sampled_from(["tensor", "sequence"]),
    share=st.sampled_from(["mad", "fixed"]), percentile_of=st.sampled_from(["signed", "abs"]),
    c=st.floats(0, 1.5), p1=st.floats(0, 100), k=st.floats(0, 4), pmin=st.floats(0, 1), pmax=st.floats(0, 1),
    kappa=st.floats(0, 3), seed=st.integers(0, 2**63 - 1), use_mask=st.booleans(), data_seed=st.integers(0, 2**31),
    shape_kind=st.sampled_from(["normal", "heavy", "uniform", "spikes", "octaves", "one_sided"]),
    scale_exp=st.integers(-30, 30), levels=st.sampled_from([0, 0, 3, 64, 1000]), values=st.lists(_specials, max_size=6),
)


def _check_fuzzed(shape, dtype, scope, share, percentile_of, c, p1, k, pmin, pmax, kappa, seed, use_mask,
                  data_seed, shape_kind, scale_exp, levels, values):
    pmin, pmax = min(pmin, pmax), max(pmin, pmax)
    config = ARMConfig(c=c, p1=p1, k=k, pmin=pmin, pmax=pmax, kappa=kappa, share=share,
                       percentile_of=percentile_of, scope=scope, seed=seed)
    gen = torch.Generator().manual_seed(data_seed)
    x = {
        "normal": lambda: torch.randn(shape, generator=gen),
        "heavy": lambda: torch.randn(shape, generator=gen) / (torch.rand(shape, generator=gen) + 1e-3),
        "uniform": lambda: torch.rand(shape, generator=gen) * 2 - 1,
        "spikes": lambda: torch.randint(-3, 4, shape, generator=gen).float() * 0.25
        + torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.1),
        "octaves": lambda: torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-20, 20, shape, generator=gen).float()),
        "one_sided": lambda: torch.randn(shape, generator=gen).abs() + 0.5,
    }[shape_kind]() * 2.0**scale_exp
    if levels:  # a coarse grid: ties at every statistic
        x = torch.round(x * levels) / levels
    flat = x.view(-1)
    for j, v in enumerate(values):
        flat[(j * 7919) % flat.numel()] = v
    x = x.to(dtype)
    mask = (torch.rand(shape[:2], generator=gen) < 0.7) if use_mask else None
    positions = torch.randint(0, 2**34, shape[:2], generator=gen)
    check(x, mask, positions, config)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES), **_LARGE_FUZZ)
def test_fuzz_parity_large_groups(dtype, **kwargs):
    _check_fuzzed((1, 3, 50_000), dtype, **kwargs)  # one group of 150,000 elements


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(SAMPLED_DTYPES), margin=st.sampled_from(["1", "0.3", "0"]), **_LARGE_FUZZ)
def test_fuzz_parity_sampled_groups(dtype, margin, **kwargs):
    import os

    os.environ["ARMQUANT_SAMPLE_MARGIN"] = margin
    try:
        _check_fuzzed(SAMPLED_SHAPE, dtype, **kwargs)
    finally:
        del os.environ["ARMQUANT_SAMPLE_MARGIN"]


# --- build and CUDA ------------------------------------------------------------------------


def test_library_carries_cuda_kernel_when_built_with_nvcc():
    import shutil
    from pathlib import Path

    from armquant import _build

    if shutil.which("nvcc") is None or not list((_build.EXPORT_DIR / "cuda").glob("*.cu")):
        pytest.skip("no nvcc or no export/cuda/*.cu: the library is CPU-only by design")
    cache = _build.EXPORT_DIR / "build" / "CMakeCache.txt"
    if _native.library_path() != _build.EXPORT_DIR / "build" / _build.LIBRARY_NAME and not cache.is_file():
        pytest.skip("library not built from this checkout's export/")
    assert _native.has_cuda(), f"{_native.library_path()} was built without its CUDA kernel although nvcc exists"
    assert Path(_native.library_path()).is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", SCOPES)
def test_cuda_kernel_matches_reference(dtype, scope):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if _native.kernel("cuda") is None:
        pytest.skip("libarmquant_ort.so was built without the CUDA kernel")
    gen = torch.Generator().manual_seed(5)
    for shape in ((1, 1, 1), (2, 3, 33), (2, 7, 5000), (1, 2, 70_000)):
        for kind in ("normal", "ties", "zeros", "nonfinite"):
            x = data(kind, shape, dtype, gen)
            mask = torch.rand(shape[:2], generator=gen) < 0.7
            positions = torch.randint(0, 2**40, shape[:2], generator=gen)
            config = ARMConfig(scope=scope, seed=99)
            got = _native.kernel("cuda")(x.cuda(), mask.cuda(), positions.cuda(), config).cpu()
            assert_same_bits(got, arm_reference(x, mask, positions, config))
