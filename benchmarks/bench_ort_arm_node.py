"""The ARM node in ONNX Runtime against one elementwise node (Add), both right after an Add node
as in a model, on the same input, interleaved round by round. The ratio is what counts: the
machine may be shared.

    python benchmarks/bench_ort_arm_node.py [--shape 1x2048x1536] [--threads 2] [--rounds 40]
        [--json benchmarks/results/ort_arm_node.json]

The ARM node runs the custom-op library's CPU kernel on the session's intra-op pool.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from armquant._io import write_json  # noqa: E402
from armquant._native import ort_library_path  # noqa: E402
from armquant._provenance import format_provenance, provenance  # noqa: E402


def session(op: str, shape: list[int], threads: int) -> ort.InferenceSession:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    opsets = [helper.make_opsetid("", 17)]
    if op == "ARM":
        node = helper.make_node("ARM", ["X"], ["Y"], domain="armquant")
        opsets.append(helper.make_opsetid("armquant", 1))
    else:
        node = helper.make_node("Add", ["X", "X"], ["Y"])
    model = helper.make_model(helper.make_graph([node], op, [x], [y]), opset_imports=opsets)
    options = ort.SessionOptions()
    options.register_custom_ops_library(ort_library_path())
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1x2048x1536", help="BxSxI of the float32 input")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of both sessions")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (min and median are reported)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ort_arm_node.json"))
    args = parser.parse_args()

    shape = [int(d) for d in args.shape.split("x")]
    arm, add = session("ARM", shape, args.threads), session("Add", shape, args.threads)
    x = {"X": np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    times = {"arm": [], "add": []}
    for _ in range(args.rounds):
        for name, sess in (("arm", arm), ("add", add)):
            add.run(None, x)  # the node before it, as in a model
            start = time.perf_counter()
            sess.run(None, x)
            times[name].append((time.perf_counter() - start) * 1e3)
    summary = {name: {"min_ms": min(t), "median_ms": float(np.median(t))} for name, t in times.items()}
    ratio = summary["arm"]["min_ms"] / summary["add"]["min_ms"]
    result = {**provenance(), "shape": shape, "threads": args.threads, "rounds": args.rounds, **summary,
              "arm_over_add": ratio}
    write_json(args.json, result)
    print(format_provenance(provenance()))
    print(f"\n{args.shape} float32, {args.threads} intra-op threads, min over {args.rounds} rounds:")
    print(f"ARM {summary['arm']['min_ms']:.2f} ms, Add {summary['add']['min_ms']:.3f} ms, ARM / Add {ratio:.2f}x")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
