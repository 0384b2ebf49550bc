"""The runtime session and the generation engine, on a tiny random Llama exported with optimum."""

from __future__ import annotations

import argparse
import queue
import threading

import numpy as np
import pytest

from armquant import _native, runtime
from armquant.generate import Engine, EngineClosed, QueueFull, SamplingParams, add_cli, sample
from tiny_onnx import SlowSession, tiny_model_dir

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["the quick brown fox", "hello", "a river runs through the old town and under", "one two three four five six"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir, max_batch_size=3, max_queue=32, threads=1) as engine:
        yield engine


def tokens(engine, prompt, params=GREEDY):
    return [t for chunk in engine.stream(prompt, params) for t in chunk.token_ids]


def test_session_runs_the_export_without_the_native_library(model_dir, monkeypatch):
    monkeypatch.setattr(_native, "library_path", lambda: None)  # as on a machine without a compiler
    assert runtime.custom_op_library() is None
    names = [i.name for i in runtime.session(model_dir).get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]


def test_session_registers_the_native_library_when_offered(model_dir, monkeypatch):
    monkeypatch.setattr(_native, "library_path", lambda: model_dir / "libmissing_armquant_ort.so")
    assert runtime.custom_op_library().endswith("libmissing_armquant_ort.so")
    with pytest.raises(Exception, match="libmissing_armquant_ort"):  # ORT tried to load it
        runtime.session(model_dir)


def test_session_names_the_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.onnx in .*armquant export"):
        runtime.session(tmp_path)


def test_greedy_matches_transformers(engine, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir) + "-torch").eval()
    for prompt in PROMPTS:
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected = out[0, ids.shape[1]:].tolist()
        if engine.tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(engine.tokenizer.eos_token_id)]
        assert tokens(engine, prompt) == expected


def test_batching_does_not_change_greedy_tokens(engine):
    """12 concurrent requests through 3 slots: rows join and leave mid-decode, prompts differ in length."""
    alone = {p: tokens(engine, p) for p in PROMPTS}
    results: dict[int, list[int]] = {}
    requests = [(i, PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=4 + i % 7, temperature=0.0)) for i in range(12)]

    def run(i, prompt, params):
        results[i] = tokens(engine, prompt, params)

    threads = [threading.Thread(target=run, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, prompt, params in requests:
        assert results[i] == alone[prompt][: params.max_tokens]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    first = tokens(engine, "hello world", params)
    outputs: list[list[int]] = []
    threads = [threading.Thread(target=lambda: outputs.append(tokens(engine, "hello world", params))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outputs == [first] * 4
    others = {tuple(tokens(engine, "hello world", SamplingParams(max_tokens=12, temperature=1.0, seed=s))) for s in range(5)}
    assert len(others) > 1  # different seeds give different samples


def test_sample_filters():
    rng = np.random.default_rng(0)
    logits = np.array([3.0, 2.5, 2.0, 1.0, 0.0, -1.0])
    assert sample(logits, SamplingParams(temperature=0.0), rng) == 0
    top2 = {sample(logits, SamplingParams(temperature=5.0, top_k=2), rng) for _ in range(300)}
    assert top2 == {0, 1}
    # probabilities at T=1: 0.47, 0.28, 0.17, ...; top_p=0.7 keeps tokens whose predecessors hold < 0.7
    nucleus = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert nucleus == {0, 1}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), rng) for _ in range(50)} == {0}
    everything = {sample(logits, SamplingParams(temperature=50.0), rng) for _ in range(2000)}
    assert everything == set(range(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens=0 must be an integer >= 1"),
        ({"temperature": -0.5}, r"temperature=-0.5 must be in \[0, 100\]"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k=-1 must be an integer >= 0"),
        ({"seed": -3}, r"seed=-3 must be an integer in \[0, 2\*\*63\)"),
        ({"stop": ("a", "")}, "non-empty strings"),
        ({"stop": ("a", "b", "c", "d", "e")}, "at most 4"),
    ],
)
def test_bad_sampling_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def _ascii_run(text: str) -> str | None:
    """A run of 2 printable ASCII characters after the start of `text` (the random model writes bytes)."""
    for i in range(1, len(text) - 1):
        if text[i: i + 2].isascii() and text[i: i + 2].isprintable():
            return text[i: i + 2]
    return None


def test_stop_strings_end_the_text_and_never_stream(engine):
    for seed in range(50):
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=seed)
        full = engine.complete("the quick brown fox", params)
        stop = _ascii_run(full)
        if stop:
            break
    assert stop, "no seed gave a text with an ASCII stop candidate"
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=seed, stop=("\x00never", stop))
    chunks = list(engine.stream("the quick brown fox", params))
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in chunks)


def test_max_tokens_and_context_length(engine):
    last = list(engine.stream("hello", SamplingParams(max_tokens=5, temperature=0.0)))[-1]
    assert (last.finish_reason, last.completion_tokens) in {("length", 5)} | {("stop", n) for n in range(5)}
    ids = engine.encode("one two three")
    long_prompt = (ids * engine.context_length)[: engine.context_length - 3]
    last = list(engine.stream(long_prompt, SamplingParams(max_tokens=50, temperature=0.0)))[-1]
    assert last.prompt_tokens + last.completion_tokens <= engine.context_length
    assert last.finish_reason in {"length", "stop"}
    with pytest.raises(ValueError, match=f"has {engine.context_length} tokens but the context length is {engine.context_length}"):
        engine.submit((ids * engine.context_length)[: engine.context_length], GREEDY, print)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit([], GREEDY, print)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([10**6], GREEDY, print)


def test_bounded_queue_cancel_and_timeout(model_dir):
    with Engine(model_dir, max_batch_size=1, max_queue=1, threads=1) as engine:
        first: queue.Queue = queue.Queue()
        engine.session = SlowSession(engine.session, delay=0.01)
        running = engine.submit("hello", SamplingParams(max_tokens=100, ignore_eos=True), first.put)
        first.get(timeout=30)  # running now holds the only slot
        waiting = engine.submit("hello", SamplingParams(max_tokens=2, temperature=0.0), lambda c: None)
        with pytest.raises(QueueFull, match="max_queue=1"):
            engine.submit("hello", GREEDY, print)
        running.cancel()
        while (chunk := first.get(timeout=30)).finish_reason is None:
            pass
        assert chunk.finish_reason == "cancelled"
        waiting.cancel()
        # the slot is free again; a timed-out request reports it
        last = list(engine.stream("hello", SamplingParams(max_tokens=100, temperature=0.0), timeout=1e-6))[-1]
        assert last.finish_reason == "timeout"
        assert engine.complete("hello", SamplingParams(max_tokens=3, temperature=0.0)) is not None


def test_close_drains_or_cancels(model_dir):
    engine = Engine(model_dir, max_batch_size=2, threads=1)
    out: queue.Queue = queue.Queue()
    engine.submit("hello", SamplingParams(max_tokens=30, temperature=0.0), out.put)
    engine.close(drain=True, timeout=30)
    chunks = [out.get_nowait() for _ in range(out.qsize())]
    assert chunks[-1].finish_reason in {"length", "stop"}
    with pytest.raises(EngineClosed):
        engine.submit("hello", GREEDY, print)

    engine = Engine(model_dir, max_batch_size=1, threads=1)
    out = queue.Queue()
    for _ in range(3):
        engine.submit("hello", SamplingParams(max_tokens=100, temperature=0.0), out.put)
    engine.close(drain=False)
    finals = [c.finish_reason for c in [out.get_nowait() for _ in range(out.qsize())] if c.finish_reason]
    assert len(finals) == 3 and "cancelled" in finals


def test_chat_template_and_cli(engine, model_dir, capsys):
    ids = engine.chat_prompt([{"role": "user", "content": "hello"}])
    assert engine.tokenizer.decode(ids).startswith("<|user|>") and engine.tokenizer.decode(ids).rstrip().endswith("<|assistant|>")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["generate", str(model_dir), "hello", "--max-tokens", "6"])
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    expected = engine.complete(ids, SamplingParams(max_tokens=6, temperature=0.0))
    assert captured.out == expected + "\n"
    assert "tokens/s" in captured.err
