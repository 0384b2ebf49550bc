"""ONNX Runtime CPU decode speed of an ARM export: FP32, INT8 dynamic, INT8 and INT4 MatMulNBits
(with zero points or symmetric, LM head quantized or float); and the ARM node alone with the custom-op
library vs the ONNX function fallback. Side by side, as ratios; with --perplexity-windows, each
variant's perplexity too.

    python benchmarks/bench_ort_decode.py MODEL [--work /tmp/armquant-bench] [--prompt 64] [--tokens 64]
        [--threads 2] [--library auto|PATH] [--extra NAME=DIR] [--perplexity-windows N] [--json ...]

MODEL: bundled name or checkpoint folder. Exports (and their quantized variants) are made once
in --work and reused. Decode speed: greedy steps of one token with the KV cache after a prompt
of --prompt tokens, best of --repeats (the variants interleaved); ARM runs with the library
when it is built. Perplexity: the first N windows of 2048 tokens of the evaluation split, ARM on
(seed 0), as `armquant eval --backend ort` computes it.
"""

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import numpy as np

from armquant import onnx as aox
from armquant import runtime
from armquant._io import write_json
from armquant._provenance import format_provenance, provenance
from armquant.models import ARMModelConfig

VARIANTS = {  # name: quantize_onnx arguments (None: the float32 export itself)
    "fp32": None,
    "int8-dynamic": dict(scheme="int8-dynamic"),
    "int8-b128-sym": dict(scheme="int8", block_size=128, symmetric=True),
    "int8-b128-asym": dict(scheme="int8", block_size=128, symmetric=False),
    "int4-b128-sym": dict(scheme="int4", block_size=128, symmetric=True),
    "int4-b128-asym": dict(scheme="int4", block_size=128, symmetric=False),
    "int4-b32-sym": dict(scheme="int4", block_size=32, symmetric=True),
    "int4-b32-asym": dict(scheme="int4", block_size=32, symmetric=False),
    "int4-b32-asym-float-head": dict(scheme="int4", block_size=32, symmetric=False, float_lm_head=True),
}


def prepare(model_name: str, work: Path) -> dict[str, Path]:
    fp32 = work / "fp32"
    if not (fp32 / aox.MODEL_FILE).is_file():
        from armquant.models import load

        model, tokenizer = load(model_name)
        aox.export(model, fp32, tokenizer, overwrite=True)
    dirs = {"fp32": fp32}
    for name, arguments in VARIANTS.items():
        if arguments is None:
            continue
        dirs[name] = work / name
        if not made_with(dirs[name], arguments):
            aox.quantize_onnx(fp32, dirs[name], overwrite=True, **arguments)
    return dirs


def made_with(folder: Path, arguments: dict) -> bool:
    """Whether `folder` holds an export quantized with these quantize_onnx arguments (defaults filled in)."""
    if not (folder / aox.INFO_FILE).is_file():
        return False
    recorded = json.loads((folder / aox.INFO_FILE).read_text()).get("quantization") or {}
    defaults = inspect.signature(aox.quantize_onnx).parameters
    keys = ["scheme", "float_lm_head"] + (["block_size", "symmetric"] if aox.SCHEMES[arguments["scheme"]] else [])
    return all(recorded.get(k) == arguments.get(k, defaults[k].default) for k in keys)


def megabytes(folder: Path) -> float:
    """The graph and its weights on disk."""
    return sum(f.stat().st_size for f in folder.glob(aox.MODEL_FILE + "*")) / 1e6


def decode_once(decoder, prompt: int, tokens: int) -> float:
    """Wall time of `tokens` greedy decode steps after a prompt (the prefill is not counted)."""
    ids = np.random.default_rng(0).integers(0, 1000, (1, prompt))
    mask = np.ones((1, prompt), np.int64)
    logits, past = decoder.run(ids, mask, aox.positions_from_mask(mask, prompt))
    start = time.perf_counter()
    for _ in range(tokens):
        next_id = logits[:, -1].argmax(-1)[:, None]
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        logits, past = decoder.run(next_id, mask, aox.positions_from_mask(mask, 1), past)
    return time.perf_counter() - start


def arm_node_seconds(shape, config, library: str, threads: int, repeats: int) -> float:
    """Median time of one armquant::ARM node on a [B, S, I] float32 input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from armquant.onnx_function import MIN_OPSET, arm_function, arm_node

    graph = helper.make_graph(
        [arm_node(["X", "mask", "positions"], ["Y"], config)], "arm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", "I"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("positions", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", "I"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET), helper.make_opsetid("armquant", 1)],
                              functions=[arm_function(MIN_OPSET)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), sess_options=runtime.session_options(library, threads),
                                   providers=["CPUExecutionProvider"])
    b, s, _ = shape
    feed = {"X": np.random.default_rng(1).standard_normal(shape, dtype=np.float32),
            "mask": np.ones((b, s), np.int64), "positions": np.arange(s, dtype=np.int64)[None].repeat(b, 0)}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--work", default="/tmp/armquant-bench-ort")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--library", default=runtime.LIBRARY_AUTO, help="ARM custom-op library: auto (the built one) or a path")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                        help="another export to measure beside the variants, e.g. of a W4A16 checkpoint (repeatable)")
    parser.add_argument("--perplexity-windows", type=int, default=0,
                        help="also the perplexity of each variant over this many windows (default 0: skip)")
    parser.add_argument("--json", default="benchmarks/results/ort_decode.json")
    args = parser.parse_args()

    dirs = prepare(args.model, Path(args.work))
    for extra in args.extra:
        name, _, folder = extra.partition("=")
        if not (Path(folder) / aox.MODEL_FILE).is_file():
            raise SystemExit(f"error: --extra {extra}: no {aox.MODEL_FILE} in {folder!r}; pass NAME=DIR of an `armquant export`")
        dirs[name] = Path(folder)
    library = runtime.custom_op_library(args.library)
    arm_library = library or runtime.LIBRARY_NONE
    decoders = {name: aox.DecoderSession(runtime.session(dirs[name], library=arm_library, threads=args.threads))
                for name in dirs}
    best = {name: float("inf") for name in decoders}
    for _ in range(args.repeats):  # interleaved, so load changes on the machine hit every variant alike
        for name, decoder in decoders.items():
            best[name] = min(best[name], decode_once(decoder, args.prompt, args.tokens))
    rows = [{"variant": name, "megabytes": megabytes(dirs[name]), "quantize_onnx": VARIANTS.get(name), "folder": str(dirs[name]),
             "decode_tokens_per_s": args.tokens / seconds} for name, seconds in best.items()]
    base = rows[0]["decode_tokens_per_s"]
    for row in rows:
        row["speedup_vs_fp32"] = row["decode_tokens_per_s"] / base
    if args.perplexity_windows:
        from transformers import AutoTokenizer

        from armquant.data import load_texts, token_windows

        tokenizer = AutoTokenizer.from_pretrained(dirs["fp32"])
        windows = token_windows(tokenizer, load_texts("sotu:evaluation"), 2048, args.perplexity_windows)
        for row in rows:
            report = aox.ort_evaluate(dirs[row["variant"]], windows, seeds=(0,), arm_off=False, library=arm_library,
                                      threads=args.threads)
            row["perplexity_arm_on_seed0"] = report["rows"][0]["perplexity"]

    arm_config = ARMModelConfig.from_dict(json.loads((dirs["fp32"] / "arm_config.json").read_text()))
    config = arm_config.for_layer(arm_config.layers[0])
    intermediate = json.loads((dirs["fp32"] / "config.json").read_text())["intermediate_size"]
    arm_rows = []
    for shape in [(1, 1, intermediate), (1, args.prompt, intermediate), (1, 2048, intermediate)]:
        function_s = arm_node_seconds(shape, config, runtime.LIBRARY_NONE, args.threads, args.repeats * 5)
        library_s = arm_node_seconds(shape, config, library, args.threads, args.repeats * 5) if library else None
        arm_rows.append({"shape": list(shape), "function_s": function_s, "library_s": library_s,
                         "library_speedup": function_s / library_s if library_s else None})

    info = provenance()
    print(f"Decode ({args.tokens} tokens after a {args.prompt}-token prompt, {args.threads} threads, "
          f"ARM via {'the library' if library else 'the ONNX function (library not built)'})")
    ppl = args.perplexity_windows > 0
    print("| variant | MB | decode tokens/s | vs fp32 |" + (f" perplexity ({args.perplexity_windows} x 2048, ARM on) |" if ppl else ""))
    print("| --- | --- | --- | --- |" + (" --- |" if ppl else ""))
    for r in rows:
        print(f"| {r['variant']} | {r['megabytes']:.0f} | {r['decode_tokens_per_s']:.1f} | {r['speedup_vs_fp32']:.2f}x |"
              + (f" {r['perplexity_arm_on_seed0']:.4f} |" if ppl else ""))
    print("\nARM node alone (median)")
    print("| shape | function fallback (ms) | library (ms) | library speedup |")
    print("| --- | --- | --- | --- |")
    for r in arm_rows:
        lib = f"{r['library_s'] * 1e3:.3f}" if r["library_s"] else "not built"
        speed = f"{r['library_speedup']:.1f}x" if r["library_speedup"] else "-"
        print(f"| {r['shape']} | {r['function_s'] * 1e3:.3f} | {lib} | {speed} |")
    print(format_provenance(info))
    write_json(args.json, {"decode": rows, "arm_node": arm_rows, "model": args.model, "prompt": args.prompt,
                           "tokens": args.tokens, "threads": args.threads, "library": library,
                           "perplexity_windows": args.perplexity_windows, **info})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
