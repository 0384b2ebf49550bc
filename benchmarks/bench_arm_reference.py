"""Reference ARM op vs a port of the published implementation, on the CPU, side by side.

    python benchmarks/bench_arm_reference.py [--repeats 3] [--json benchmarks/results/arm_reference.json]

The reference computes the specification exactly (three sorts per group, Philox for the moved
elements); the published code uses topk and a host-side NumPy percentile. Reported as ratios.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_arm import published_arm  # noqa: E402

from armquant._io import write_json  # noqa: E402
from armquant._provenance import format_provenance, provenance  # noqa: E402
from armquant.arm import PRESETS, arm_reference  # noqa: E402

SHAPES = [(1, 2048, 1536), (1, 2048, 14336)]


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/arm_reference.json")
    args = parser.parse_args()
    config = PRESETS["llama-3.1"]
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape)
        published = best_of(lambda: published_arm(x, config.c, config.p1, config.k, config.pmin, config.pmax, config.kappa), args.repeats)
        reference = best_of(lambda: arm_reference(x, config=config), args.repeats)
        elementwise = best_of(lambda: torch.add(x, 1.0), args.repeats)
        rows.append({
            "shape": list(shape), "published_s": published[0], "reference_s": reference[0], "elementwise_s": elementwise[0],
            "reference_over_published": reference[0] / published[0],
        })
    info = provenance()
    print("| shape | published (s) | reference (s) | reference / published | one elementwise pass (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['published_s']:.3f} | {r['reference_s']:.3f} | {r['reference_over_published']:.2f}x | {r['elementwise_s']:.4f} |")
    print(f"(best of {args.repeats}; float32; llama-3.1 preset)\n" + format_provenance(info))
    write_json(args.json, {"rows": rows, "repeats": args.repeats, **info})


if __name__ == "__main__":
    main()
