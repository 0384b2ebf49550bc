"""Perplexity over non-overlapping token windows, with ARM off and on over several seeds."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Union

import torch
from tqdm.auto import tqdm

from armquant._io import write_json
from armquant._provenance import provenance
from armquant.cli import positive_int

__all__ = ["perplexity", "evaluate", "format_table"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _logits_fn(model) -> LogitsFn:
    if isinstance(model, torch.nn.Module):
        device = next(model.parameters()).device
        return lambda ids: model(ids.to(device), use_cache=False).logits
    return model


@torch.no_grad()
def perplexity(model: Union[torch.nn.Module, LogitsFn], windows: torch.Tensor, progress: bool = True, desc: str = "perplexity") -> dict:
    """Token-level perplexity of `model` over `windows` ([n, L] token ids), one window a forward.

    `model` is a causal LM or a callable `input_ids [1, L] -> logits [1, L, V]` (e.g. ONNX Runtime).
    """
    forward = _logits_fn(model)
    total_nll, total_tokens = 0.0, 0
    for row in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        ids = row[None, :]
        logits = torch.as_tensor(forward(ids)).float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].cpu(), ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += ids.shape[1] - 1
    return {"perplexity": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens, "tokens": total_tokens}


def evaluate(model: torch.nn.Module, windows: torch.Tensor, seeds=(0, 1, 2), arm_off: bool = True, progress: bool = True) -> dict:
    """Perplexity with ARM off (if asked) and with ARM on for each seed, plus mean and spread."""
    from armquant.models import arm_enabled, arm_sites, set_arm_seed

    def run(arm: bool, seed):
        if not arm:
            with arm_enabled(model, False):
                return perplexity(model, windows, progress, desc="ARM off")
        set_arm_seed(model, seed)
        return perplexity(model, windows, progress, desc=f"ARM on, seed {seed}")

    return arm_report(run, bool(arm_sites(model)), seeds, arm_off, windows)


def arm_report(run: Callable[[bool, object], dict], has_arm: bool, seeds, arm_off: bool, windows: torch.Tensor) -> dict:
    """Call `run(arm, seed)` for ARM off and each seed; tabulate with mean and spread.

    Shared by every backend: `run` returns perplexity()'s dict for that setting.
    """
    settings = ([(False, None)] if arm_off or not has_arm else []) + ([(True, s) for s in seeds] if has_arm else [])
    rows = []
    for arm, seed in settings:
        start = time.perf_counter()
        result = run(arm, seed)
        rows.append({"arm": arm, "seed": seed, **result, "seconds": time.perf_counter() - start})
    on = [r["perplexity"] for r in rows if r["arm"]]
    summary = {"arm_off": next((r["perplexity"] for r in rows if not r["arm"]), None)}
    if on:
        summary["arm_on_mean"] = statistics.fmean(on)
        summary["arm_on_std"] = statistics.stdev(on) if len(on) > 1 else 0.0
    return {"rows": rows, "summary": summary, "windows": int(windows.shape[0]), "window_length": int(windows.shape[1])}


def format_table(report: dict) -> str:
    lines = ["| ARM | seed | perplexity | tokens | seconds |", "| --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        seed = "-" if r["seed"] is None else str(r["seed"])
        lines.append(f"| {'on' if r['arm'] else 'off'} | {seed} | {r['perplexity']:.4f} | {r['tokens']} | {r['seconds']:.1f} |")
    s = report["summary"]
    n = sum(r["arm"] for r in report["rows"])
    if n > 1:  # one seed has no spread to show
        lines.append(f"| on | mean ± std ({n} seeds) | {s['arm_on_mean']:.4f} ± {s['arm_on_std']:.4f} | | |")
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------


def _cmd_eval(args) -> int:
    from armquant.data import load_texts, token_windows

    if args.backend == "ort":
        from transformers import AutoTokenizer

        from armquant.onnx import export_arm_config, ort_evaluate
        from armquant.runtime import model_file

        model_file(args.model)  # before the tokenizer and the data: the usual mistake is a checkpoint folder
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        windows = token_windows(tokenizer, load_texts(args.data), args.window, args.max_windows)
        print(f"{args.model} (ONNX Runtime): {windows.shape[0]} windows x {windows.shape[1]} tokens from {args.data}")
        arm = export_arm_config(args.model)
        report = ort_evaluate(args.model, windows, seeds=args.seeds, arm_off=not args.no_arm_off, library=args.library)
    else:
        from armquant.models import describe, load_from_args

        model, tokenizer = load_from_args(args)
        windows = token_windows(tokenizer, load_texts(args.data), args.window, args.max_windows)
        print(f"{args.model}: {windows.shape[0]} windows x {windows.shape[1]} tokens from {args.data}")
        arm = describe(model)["arm"]  # before the seeds are set
        report = evaluate(model, windows, seeds=args.seeds, arm_off=not args.no_arm_off)
    report.update(model=args.model, data=args.data, arm=arm, **provenance())
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def add_cli(subparsers) -> None:
    from armquant.models import add_arm_arguments

    p = subparsers.add_parser(
        "eval", help="perplexity with ARM off and on (several seeds)",
        description="Token-level perplexity over non-overlapping windows (the GPTQ/AWQ protocol), "
        "with ARM off and with ARM on for each seed; prints a table and optionally writes JSON.",
    )
    p.add_argument("model", help="bundled name (smollm2-135m, gemma3-270m), .gguf file, checkpoint folder, "
                   "or with --backend ort a folder written by `armquant export`")
    p.add_argument("--backend", choices=["torch", "ort"], default="torch", help="PyTorch (default) or ONNX Runtime")
    p.add_argument("--library", default="auto", metavar="auto|none|PATH",
                   help="with --backend ort: the ARM custom-op library (auto: the built one, none: ARM's ONNX function)")
    p.add_argument("--data", default="sotu:evaluation", help="data source (default: sotu:evaluation; also a .txt file, a folder, hf:DATASET:CONFIG:SPLIT)")
    p.add_argument("--window", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="evaluate only the first N windows")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ARM seeds (default 0 1 2)")
    p.add_argument("--no-arm-off", action="store_true", help="skip the ARM-off baseline")
    p.add_argument("--json", help="write the report to this JSON file")
    add_arm_arguments(p)
    p.set_defaults(handler=_cmd_eval)
