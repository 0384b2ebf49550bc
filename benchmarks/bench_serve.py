"""Load benchmark: `armquant serve` under N concurrent requests vs optimum's sequential generate.

Both sides run greedy decoding of the same prompts for the same number of new tokens
(`ignore_eos` on the server, `min_new_tokens` for optimum) on the same ONNX model, with ONNX
Runtime on the CPU. The anchor is `ORTModelForCausalLM.generate`, one prompt after another; the
server runs in its own process on a loopback port and the load comes from asyncio clients here.

    python benchmarks/bench_serve.py --model-dir out/smollm2-int4      # an `armquant export`
    python benchmarks/bench_serve.py                                   # optimum export of the bundled GGUF

It prints a table and writes JSON (with command, git revision, versions and machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from armquant._io import write_json  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "sotu"
DEFAULT_CACHE = Path.home() / ".cache" / "armquant-bench" / "smollm2-135m-optimum"

def optimum_export_of_bundled_model(out: Path) -> Path:
    """The bundled SmolLM2-135M GGUF, dequantized by transformers and exported by optimum (fp32)."""
    if (out / "model.onnx").is_file():
        return out
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from armquant.models import resolve_gguf

    gguf = resolve_gguf("smollm2-135m")
    print(f"exporting {gguf.name} with optimum to {out} (once)", flush=True)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        staging = Path(tmp) / "onnx"
        main_export(tmp, output=str(staging), task="text-generation-with-past")
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)  # complete or absent, never half-written
    return out


def evaluation_prompts(corpus: Path, n: int, words: int) -> list[str]:
    """The first `words` words of paragraphs of the evaluation split (years 2000-2021), spread evenly."""
    prompts = []
    for path in sorted(corpus.glob("*.txt")):
        if not 2000 <= int(path.name[:4]) <= 2021:
            continue
        for paragraph in path.read_text().split("\n"):
            tokens = paragraph.split()
            if len(tokens) >= words:
                prompts.append(" ".join(tokens[:words]))
    if len(prompts) < n:
        raise ValueError(f"the corpus at {corpus} gave {len(prompts)} prompts, fewer than --requests {n}")
    step = len(prompts) // n
    return [prompts[i * step] for i in range(n)]


def run_anchor(model_dir: Path, prompts: list[str], max_tokens: int, threads: int | None) -> dict:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from armquant.runtime import session_options

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = ORTModelForCausalLM.from_pretrained(model_dir, use_cache=True, session_options=session_options(threads))
    latencies, outputs, tokens = [], [], 0
    start = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        latencies.append(time.perf_counter() - t0)
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
        tokens += len(new)
    return _summary("optimum ORTModelForCausalLM.generate, sequential", 1, start, latencies, tokens, 0, outputs)


async def _load(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[list, list, int, int]:
    import httpx

    limit = asyncio.Semaphore(concurrency)
    latencies, outputs, errors, tokens = [], [None] * len(prompts), [], 0

    async def one(i: int, client) -> None:
        nonlocal tokens
        async with limit:
            t0 = time.perf_counter()
            body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            try:
                response = await client.post(url + "/v1/completions", json=body)
            except httpx.HTTPError as error:
                errors.append(repr(error))
                return
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                return
            data = response.json()
            latencies.append(time.perf_counter() - t0)
            outputs[i] = data["choices"][0]["text"]
            tokens += data["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one(i, client) for i in range(len(prompts))))
    return latencies, outputs, errors, tokens


def run_server(model_dir: Path, prompts: list[str], max_tokens: int, concurrencies: list[int], threads: int | None, max_queue: int) -> list[dict]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "armquant.cli", "serve", str(model_dir), "--port", str(port),
               "--max-batch-size", str(max(concurrencies)), "--max-queue", str(max_queue), "--request-timeout", "600"]
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}:\n{server.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 300 s")
            time.sleep(0.2)
        asyncio.run(_load(url, prompts[:2], 4, 2))  # warm up
        rows = []
        for concurrency in concurrencies:
            start = time.perf_counter()
            latencies, outputs, errors, tokens = asyncio.run(_load(url, prompts, max_tokens, concurrency))
            rows.append(_summary(f"armquant serve, {concurrency} concurrent", concurrency, start, latencies, tokens, len(errors), outputs))
            rows[-1]["error_examples"] = errors[:3]
        return rows
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def _summary(name: str, concurrency: int, start: float, latencies: list, tokens: int, errors: int, outputs: list) -> dict:
    seconds = time.perf_counter() - start
    return {
        "name": name,
        "concurrency": concurrency,
        "seconds": seconds,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "p50_latency_s": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_latency_s": float(np.percentile(latencies, 99)) if latencies else None,
        "errors": errors,
        "outputs": outputs,
    }


def _environment() -> dict:
    import importlib.metadata

    from armquant._provenance import provenance

    packages = ["optimum", "optimum-onnx", "transformers", "numpy", "fastapi", "uvicorn"]
    return {**provenance(), **{p: importlib.metadata.version(p) for p in packages}, "load_avg_at_start": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="an exported model (default: optimum export of the bundled GGUF)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the optimum export of the bundled model is kept")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="folder of YEAR_*.txt addresses (the project's sotu corpus)")
    parser.add_argument("--requests", type=int, default=32, help="prompts per run (default 32)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="concurrent clients (default 1 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--prompt-words", type=int, default=40, help="words per prompt (default 40)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads on both sides")
    parser.add_argument("--max-queue", type=int, default=64, help="server queue limit; keep --requests below it")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json", help="where to write the results")
    args = parser.parse_args()
    if args.requests > args.max_queue + max(args.concurrency):
        parser.error(f"--requests {args.requests} exceeds the queue limit {args.max_queue} + batch; errors would be expected")

    env = _environment()
    model_dir = args.model_dir
    if model_dir is None or not (model_dir / "model.onnx").is_file():
        if model_dir is not None:
            print(f"no model.onnx in {model_dir}; using the optimum export of the bundled model", flush=True)
        model_dir = optimum_export_of_bundled_model(args.cache_dir)
    prompts = evaluation_prompts(args.corpus, args.requests, args.prompt_words)
    print(f"model {model_dir}; {len(prompts)} prompts of {args.prompt_words} words; {args.max_tokens} new tokens each", flush=True)

    rows = run_server(model_dir, prompts, args.max_tokens, args.concurrency, args.threads, args.max_queue)
    anchor = run_anchor(model_dir, prompts, args.max_tokens, args.threads)
    rows.insert(0, anchor)
    for row in rows:
        row["speedup_vs_anchor"] = row["tokens_per_s"] / anchor["tokens_per_s"]
        same = [a == b for a, b in zip(anchor["outputs"], row["outputs"]) if b is not None]
        row["same_text_as_anchor"] = f"{sum(same)}/{len(same)}"

    header = f"{'run':<52} {'tok/s':>8} {'x anchor':>9} {'p50 s':>7} {'p99 s':>7} {'errors':>6} {'same text':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<52} {r['tokens_per_s']:>8.1f} {r['speedup_vs_anchor']:>9.2f} {r['p50_latency_s']:>7.2f} {r['p99_latency_s']:>7.2f} {r['errors']:>6} {r['same_text_as_anchor']:>9}")
    result = {**env, "model_dir": str(model_dir), "requests": len(prompts), "max_tokens": args.max_tokens,
              "prompt_words": args.prompt_words, "threads": args.threads, "runs": rows}
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
