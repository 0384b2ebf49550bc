"""ARM on the CPU: the native kernel against the PyTorch reference and one elementwise pass.

Every timing runs side by side in this process, interleaved round by round, with the same
thread count; the table shows ratios (the machine may be shared, absolute times drift):

    speedup   = reference / native          (target: >= 10)
    vs_add    = native / torch.add(x, 1.0)  (one read and one freshly allocated write; target: <= 5)
    vs_abs    = native / x.abs()
    paired    = the median over rounds of native / add within the same round, with its
                quartiles in the JSON: steadier than the ratio of minima when the load of the
                machine drifts between rounds
    loops     = native / add, each timed in a loop of back-to-back calls (best of three
                loops): every call then finds x and its own output still in cache, which
                speeds the elementwise pass more than ARM, so this ratio is the higher one
    out       = paired, as above, with both writing into an output allocated once (add with
                out=), as ONNX Runtime's arena hands the op its output. A fresh output of more
                than 32 MB is fresh pages from the kernel on every call, and their faults then
                dominate both sides: at [1, 2048, 14336] float32 they are most of add's time
    vs base   = the median over rounds of native / baseline, with --baseline-library naming
                another build of the library (say, of the previous commit), run in the same
                rounds: how a change to the kernel moved its speed

    python benchmarks/bench_arm_cpu.py --threads 2
    python benchmarks/bench_arm_cpu.py --threads 2 --baseline-library /tmp/before/libarmquant_ort.so
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from armquant import _native  # noqa: E402
from armquant._provenance import provenance  # noqa: E402
from armquant.arm import ARMConfig, arm_reference  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def machine() -> dict:
    """provenance() and what a CPU timing also depends on: the CPUs this process may use, the
    load when it started, the library measured."""
    return {**provenance(), "usable_cpus": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg(),
            "platform": platform.platform(), "library": str(_native.library_path())}


def best_of(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def loop_ms(fn, seconds: float = 0.1, loops: int = 3) -> float:
    """Milliseconds per call of fn in back-to-back calls: the best of `loops` loops of about
    `seconds` each."""
    start = time.perf_counter()
    fn()
    calls = max(3, int(seconds / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def paired(times: dict, numerator: str, denominator: str) -> dict:
    """The median and quartiles over rounds of numerator / denominator within each round."""
    ratios = sorted(n / d for n, d in zip(times[numerator], times[denominator]))
    return {"median": ratios[len(ratios) // 2], "q1": ratios[len(ratios) // 4], "q3": ratios[(3 * len(ratios)) // 4]}


def bench(shape, dtype, scope: str, rounds: int, reference_rounds: int, baseline=None, inputs: int = 1) -> dict:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(inputs)]
    config = ARMConfig(scope=scope)
    native = _native.kernel("cpu")
    candidates = {
        "native": lambda x: native(x, None, None, config),
        "add": lambda x: torch.add(x, 1.0),
        "abs": lambda x: x.abs(),
    }
    native_out, add_out = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    candidates["native_out"] = lambda x: native(x, None, None, config, out=native_out)
    candidates["add_out"] = lambda x: torch.add(x, 1.0, out=add_out)
    if baseline is not None:
        candidates["baseline"] = lambda x: baseline(x, None, None, config)
        if not torch.equal(candidates["native"](xs[0]).view(torch.uint8), candidates["baseline"](xs[0]).view(torch.uint8)):
            raise SystemExit("error: the baseline library computes a different ARM output; compare builds of one op")
    for fn in candidates.values():
        fn(xs[0])  # warm up: page in, spawn nothing lazily inside the timing
    times = {name: [] for name in candidates}
    times["reference"] = []
    for r in range(rounds):  # interleaved, so that load from elsewhere hits all alike
        x = xs[r % inputs]
        # Every other round in reverse order: what runs first after the previous round (whose
        # buffers it finds in cache, or not) changes, and no candidate always gets that slot.
        order = list(candidates.items()) if r % 2 == 0 else list(reversed(candidates.items()))
        for name, fn in order:
            times[name] += best_of(lambda: fn(x), 1)
        if r < reference_rounds:
            times["reference"] += best_of(lambda: arm_reference(x, None, None, config), 1)

    def cycling(fn):  # each call on the next input
        following = itertools.cycle(xs)
        return lambda: fn(next(following))

    loops = {name: loop_ms(cycling(candidates[name])) for name in ("native", "add")}
    ms = {name: 1e3 * min(values) for name, values in times.items() if values}  # no reference with 0 rounds
    row = {
        "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "scope": scope, "rounds": rounds, "inputs": inputs,
        "reference_rounds": reference_rounds, "min_ms": ms,
        "median_ms": {name: 1e3 * sorted(v)[len(v) // 2] for name, v in times.items() if v},
        "speedup": ms["reference"] / ms["native"] if "reference" in ms else None, "vs_add": ms["native"] / ms["add"], "vs_abs": ms["native"] / ms["abs"],
        "vs_add_paired": paired(times, "native", "add"),
        "vs_add_out_paired": paired(times, "native_out", "add_out"),
        "loop_ms": loops, "vs_add_loops": loops["native"] / loops["add"],
    }
    if baseline is not None:
        row["vs_baseline_paired"] = paired(times, "native", "baseline")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads, also used by the native kernel")
    parser.add_argument("--shapes", default="1x2048x1536,1x2048x14336", help="comma-separated BxSxI")
    parser.add_argument("--dtypes", default="float32", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--scopes", default="sequence", help="comma-separated: tensor, sequence, token")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of native, add, abs and their out= forms (min is reported)")
    parser.add_argument("--reference-rounds", type=int, default=3,
                        help="timed rounds of the slow reference (0: not timed, no speedup column)")
    parser.add_argument("--inputs", type=int, default=1,
                        help="random inputs to cycle through, round by round and call by call in the loops: with one, "
                             "a small group's branches repeat every call and the CPU learns them (decode shapes: 512)")
    parser.add_argument("--baseline-library", type=Path, default=None,
                        help="another build of libarmquant_ort.so to time against the current one, round by round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_arm_cpu.json"))
    args = parser.parse_args()
    if args.reference_rounds < 0 or args.rounds < 1:
        print("error: --rounds must be at least 1 and --reference-rounds at least 0", file=sys.stderr)
        return 1
    if args.inputs < 1:
        print(f"error: --inputs {args.inputs}: give at least one input", file=sys.stderr)
        return 1
    if _native.kernel("cpu") is None:
        print("error: the native kernel is not built; run `python -m armquant._native --build`", file=sys.stderr)
        return 1
    baseline = None
    if args.baseline_library is not None:
        if not args.baseline_library.is_file():
            print(f"error: --baseline-library {args.baseline_library} is not a file; build the other commit's "
                  "library first (cmake -S export -B <dir> && cmake --build <dir>)", file=sys.stderr)
            return 1
        if args.baseline_library.resolve() == Path(_native.library_path()).resolve():
            print("error: --baseline-library is the library under test; name another build", file=sys.stderr)
            return 1
        baseline = _native.cpu_kernel_from(args.baseline_library)
    torch.set_num_threads(args.threads)
    record = {"command": " ".join([Path(sys.executable).name] + sys.argv), "threads": args.threads,
              "machine": machine(), "baseline_library": str(args.baseline_library or ""), "results": []}
    header = f"{'shape':>16} {'dtype':>9} {'scope':>9} | {'reference':>10} {'native':>8} {'add':>7} {'abs':>7} ms | {'speedup':>8} {'vs add':>7} {'vs abs':>7} {'paired':>7} {'loops':>7} {'out':>7}"
    if baseline is not None:
        header += f" {'vs base':>8}"
    print(f"{record['machine']['cpu']}, {args.threads} threads, CPU kernel paths: {record['machine']['cpu_kernel_paths']}")
    print(header)
    print("-" * len(header))
    for shape_text in args.shapes.split(","):
        shape = tuple(int(d) for d in shape_text.split("x"))
        for dtype_name in args.dtypes.split(","):
            for scope in args.scopes.split(","):
                row = bench(shape, DTYPES[dtype_name], scope, args.rounds, args.reference_rounds, baseline, args.inputs)
                record["results"].append(row)
                ms = row["min_ms"]
                reference = f"{ms['reference']:10.1f}" if row["speedup"] else f"{'-':>10}"
                speedup = f"{row['speedup']:7.1f}x" if row["speedup"] else f"{'-':>8}"
                line = (f"{shape_text:>16} {dtype_name:>9} {scope:>9} | {reference} {ms['native']:8.2f} "
                        f"{ms['add']:7.2f} {ms['abs']:7.2f}    | {speedup} {row['vs_add']:6.2f}x "
                        f"{row['vs_abs']:6.2f}x {row['vs_add_paired']['median']:6.2f}x {row['vs_add_loops']:6.2f}x "
                        f"{row['vs_add_out_paired']['median']:6.2f}x")
                if baseline is not None:
                    line += f" {row['vs_baseline_paired']['median']:7.3f}x"
                print(line, flush=True)
    record["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(record, tmp, indent=2)
    os.replace(tmp.name, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
