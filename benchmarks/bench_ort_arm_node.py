"""The ARM node in ONNX Runtime against one elementwise node (Add), in one session as in a
model: X -> Add -> ARM, timed node by node by ONNX Runtime's profiler over many runs. The
ratio is what counts: the machine may be shared.

    python benchmarks/bench_ort_arm_node.py [--shape 1x2048x1536] [--threads 2] [--rounds 40]
        [--json benchmarks/results/ort_arm_node.json]

The ARM node runs the custom-op library's CPU kernel on the session's intra-op pool. Both
nodes share that pool: two sessions (one per node) would each keep a pool whose workers spin
after a run and take the cores the other session's next node needs.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from armquant._io import write_json  # noqa: E402
from armquant._native import ort_library_path  # noqa: E402
from armquant._provenance import format_provenance, provenance  # noqa: E402

WARMUP_RUNS = 3


def session(shape: list[int], threads: int, profile_dir: str) -> ort.InferenceSession:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Add", ["X", "X"], ["Z"], name="add"),
             helper.make_node("ARM", ["Z"], ["Y"], name="arm", domain="armquant")]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("armquant", 1)]
    model = helper.make_model(helper.make_graph(nodes, "add_then_arm", [x], [y]), opset_imports=opsets)
    options = ort.SessionOptions()
    options.register_custom_ops_library(ort_library_path())
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(profile_dir) / "ort_arm_node")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def node_times_ms(profile: Path) -> dict[str, list[float]]:
    """Per node, its kernel time in each run, in run order."""
    times: dict[str, list[float]] = {"add": [], "arm": []}
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            if node in times:
                times[node].append(event["dur"] / 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1x2048x1536", help="BxSxI of the float32 input")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of the session")
    parser.add_argument("--rounds", type=int, default=40, help="timed runs (min, median and paired ratio reported)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ort_arm_node.json"))
    args = parser.parse_args()

    shape = [int(d) for d in args.shape.split("x")]
    x = {"X": np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    with tempfile.TemporaryDirectory() as profile_dir:
        sess = session(shape, args.threads, profile_dir)
        for _ in range(WARMUP_RUNS + args.rounds):
            sess.run(None, x)
        times = {name: t[WARMUP_RUNS:] for name, t in node_times_ms(Path(sess.end_profiling())).items()}
    if any(len(t) != args.rounds for t in times.values()):
        raise SystemExit(f"error: the profile holds {({k: len(v) for k, v in times.items()})} node runs, "
                         f"expected {args.rounds} each after {WARMUP_RUNS} warm-up runs")
    paired = sorted(a / b for a, b in zip(times["arm"], times["add"]))
    summary = {name: {"min_ms": min(t), "median_ms": float(np.median(t))} for name, t in times.items()}
    ratio = summary["arm"]["min_ms"] / summary["add"]["min_ms"]
    result = {**provenance(), "shape": shape, "threads": args.threads, "rounds": args.rounds, **summary,
              "arm_over_add": ratio, "arm_over_add_paired_median": paired[len(paired) // 2]}
    write_json(args.json, result)
    print(format_provenance(provenance()))
    print(f"\n{args.shape} float32, {args.threads} intra-op threads, {args.rounds} runs of X -> Add -> ARM:")
    print(f"ARM min {summary['arm']['min_ms']:.2f} ms (median {summary['arm']['median_ms']:.2f}), "
          f"Add min {summary['add']['min_ms']:.3f} ms (median {summary['add']['median_ms']:.3f})")
    print(f"ARM / Add: {ratio:.2f}x of minima, {paired[len(paired) // 2]:.2f}x median of per-run ratios")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
