"""Text generation from an exported model on ONNX Runtime, and the `armquant generate` command.

One engine thread owns the ONNX Runtime session and decodes every running request together
(continuous batching): between two decode steps it prefills the requests that have queued up and
joins them to the batch; rows leave the batch as soon as they finish, are cancelled or time out.
Rows share one padded KV cache, left-padded so that every row's newest token sits in the last
column; `attention_mask` hides the padding and `position_ids` count each row's own tokens, so a
row's tokens do not depend on which other requests share its batch.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from armquant import runtime
from armquant.cli import positive_int

logger = logging.getLogger(__name__)

# Padded tokens a single prefill call may hold; bounds the [rows, tokens, vocab] logits it returns.
PREFILL_TOKEN_BUDGET = 2048
MAX_STOP_STRINGS = 4
FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


class QueueFull(RuntimeError):
    """The engine's request queue is at its limit; retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature=0 is greedy; top_k=0 and top_p=1 disable those filters.

    ignore_eos=True keeps generating past end-of-sequence tokens (for benchmarks with fixed lengths).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r} must be in [0, 100] (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 disables nucleus sampling)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables top-k)")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63)")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)!r} must be at most {MAX_STOP_STRINGS} non-empty strings")


@dataclasses.dataclass
class Chunk:
    """New output of one request. The last chunk has a finish_reason (one of FINISH_REASONS)."""

    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None


class Request:
    """A submitted generation; `cancel()` frees its batch slot at the next decode step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Chunk], None], deadline: Optional[float]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.deadline = deadline
        self.rng = np.random.default_rng(params.seed)
        self.generated: list[int] = []
        self.pending: Optional[int] = None  # sampled, streamed, not yet fed to the model
        self.sent_chars = 0
        self.finished = False
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def _expired(self, now: float) -> Optional[str]:
        if self._cancelled:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None


@dataclasses.dataclass
class _Layout:
    """Where the KV cache goes in and comes out of the graph, and its per-row shape and dtype."""

    past_inputs: list[str]
    present_outputs: list[str]
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    has_position_ids: bool

    @classmethod
    def of(cls, session, config: dict) -> "_Layout":
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        required = {"input_ids", "attention_mask"}
        past = sorted(
            (n for n in inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.split(".")[2]),
        )
        unknown = set(inputs) - required - set(past) - {"position_ids"}
        if not required <= set(inputs) or not past or "logits" not in outputs or unknown:
            raise ValueError(
                f"model.onnx has inputs {sorted(inputs)} and outputs {sorted(outputs)}; expected a decoder "
                "with KV cache (input_ids, attention_mask, position_ids, past_key_values.N.key/value -> "
                "logits, present.N.key/value); export with task text-generation-with-past"
            )
        present = [n.replace("past_key_values.", "present.", 1) for n in past]
        missing = [n for n in present if n not in outputs]
        if missing:
            raise ValueError(f"model.onnx lacks KV cache outputs {missing}; export with task text-generation-with-past")
        shape = inputs[past[0]].shape
        heads_cfg = config.get("num_key_value_heads") or config.get("num_attention_heads")
        head_dim_cfg = config.get("head_dim") or (
            config["hidden_size"] // config["num_attention_heads"] if "hidden_size" in config else None
        )
        kv_heads = shape[1] if isinstance(shape[1], int) else heads_cfg
        head_dim = shape[3] if isinstance(shape[3], int) else head_dim_cfg
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(inputs[past[0]].type)
        if kv_heads is None or head_dim is None or dtype is None:
            raise ValueError(f"cannot tell the KV cache shape/dtype of {past[0]} ({shape}, {inputs[past[0]].type})")
        return cls(past, present, int(kv_heads), int(head_dim), np.dtype(dtype), "position_ids" in inputs)


class _Batch:
    """Rows decoding together: their requests and one left-padded KV cache [rows, heads, L, head_dim]."""

    def __init__(self, requests: list[Request], past: list[np.ndarray], mask: np.ndarray):
        self.requests = requests
        self.past = past
        self.mask = mask  # [rows, L] 1 for real tokens, 0 for padding

    def __len__(self) -> int:
        return len(self.requests)

    def join(self, other: "_Batch") -> "_Batch":
        if not self.requests:
            return other
        length = max(self.mask.shape[1], other.mask.shape[1])
        past = [np.concatenate([_left_pad(a, length, 2), _left_pad(b, length, 2)]) for a, b in zip(self.past, other.past)]
        mask = np.concatenate([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        return _Batch(self.requests + other.requests, past, mask)

    def keep(self, rows: list[int]) -> "_Batch":
        """The batch with only `rows`, dropping cache columns that are padding in every kept row."""
        if len(rows) == len(self.requests):
            return self
        mask = self.mask[rows]
        real = np.flatnonzero(mask.any(axis=0))
        start = int(real[0]) if len(real) else mask.shape[1]
        return _Batch([self.requests[i] for i in rows], [p[rows, :, start:] for p in self.past], mask[:, start:])


def _left_pad(a: np.ndarray, length: int, axis: int) -> np.ndarray:
    missing = length - a.shape[axis]
    if missing == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (missing, 0)
    return np.pad(a, widths)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a row of logits [vocab] under `params`."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of strictly more likely tokens
        probs[order[before >= params.top_p]] = 0.0  # the most likely token always stays
        probs /= probs.sum()
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), x.size - 1))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class Engine:
    """Generation over an exported model directory, serving concurrent requests in one batch.

    >>> with Engine("out/") as engine:
    ...     text = engine.complete("Hello", SamplingParams(max_tokens=8, temperature=0))
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        providers: Optional[Sequence[str]] = None,
        threads: Optional[int] = None,
    ):
        from transformers import AutoTokenizer

        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size={max_batch_size} and max_queue={max_queue} must be >= 1")
        model_dir = Path(model_dir)
        self.model_dir = model_dir
        self.session = runtime.session(model_dir, providers=providers, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        config = _read_json(model_dir / "config.json")
        self.layout = _Layout.of(self.session, config)
        self.vocab_size = len(self.tokenizer)
        self.context_length = int(config.get("max_position_embeddings") or self.tokenizer.model_max_length)
        eos = _read_json(model_dir / "generation_config.json").get("eos_token_id", config.get("eos_token_id"))
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: collections.deque[Request] = collections.deque()
        self._active = 0
        self._cond = threading.Condition()
        self._closing = False
        self._drain = True
        self._thread = threading.Thread(target=self._loop, name="armquant-engine", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Requests in the running batch."""
        return self._active

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` under the tokenizer's chat template, ready for the reply."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {self.model_dir} has no chat template; send a plain prompt instead")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise ValueError naming the problem if `prompt_ids` cannot be generated from."""
        vocab = self.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the context length is {self.context_length}; "
                "shorten the prompt so there is room for at least one new token"
            )
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        sink: Callable[[Chunk], None],
        timeout: Optional[float] = None,
    ) -> Request:
        """Queue a request; `sink` receives its Chunks from the engine thread. Raises QueueFull."""
        ids = self.encode(prompt)
        self.check_prompt(ids)
        deadline = time.monotonic() + timeout if timeout else None
        request = Request(ids, params, sink, deadline)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down; no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already queued (max_queue={self.max_queue}); retry later")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def stream(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams(), timeout: Optional[float] = None) -> Iterator[Chunk]:
        """Chunks of one request as they are decoded; closing the iterator cancels the request."""
        chunks: queue.Queue[Chunk] = queue.Queue()
        request = self.submit(prompt, params, chunks.put, timeout)
        try:
            while True:
                chunk = chunks.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            request.cancel()

    def complete(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams(), timeout: Optional[float] = None) -> str:
        return "".join(chunk.text for chunk in self.stream(prompt, params, timeout))

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; finish queued and running ones (drain) or cancel them.

        If draining takes longer than `timeout` seconds, what is left is cancelled.
        """
        with self._cond:
            self._closing = True
            self._drain = drain
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._drain = False
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=False)

    # -- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        batch = _Batch([], [], np.zeros((0, 0), np.int64))
        while True:
            with self._cond:
                while not self._waiting and not batch and not self._closing:
                    self._cond.wait()
                if self._closing and (not self._drain or (not self._waiting and not batch)):
                    for request in list(self._waiting) + batch.requests:
                        self._finish(request, "cancelled")
                    self._waiting.clear()
                    self._active = 0
                    return
                now = time.monotonic()
                for request in [r for r in self._waiting if r._expired(now)]:
                    self._waiting.remove(request)
                    self._finish(request, request._expired(now))
                new = []
                while self._waiting and len(batch) + len(new) < self.max_batch_size:
                    new.append(self._waiting.popleft())
                self._active = len(batch) + len(new)
            try:
                if new:
                    batch = batch.join(self._prefill(new))
                batch = self._retire(batch)
                if batch:
                    batch = self._retire(self._decode(batch))
            except Exception as error:  # keep serving: fail only the requests in this batch
                logger.exception("generation failed")
                for request in batch.requests + new:
                    self._finish(request, "error", error=f"{type(error).__name__}: {error}")
                batch = _Batch([], [], np.zeros((0, 0), np.int64))
            with self._cond:
                self._active = len(batch)

    def _run(self, input_ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        # input_ids: [B, S]; mask: [B, L + S]; past: [B, heads, L, head_dim] each
        layout = self.layout
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if layout.has_position_ids:
            positions = np.cumsum(mask, axis=1) - 1
            feeds["position_ids"] = np.where(mask == 0, 1, positions)[:, -input_ids.shape[1]:]
        feeds.update(zip(layout.past_inputs, past))
        outputs = self.session.run(["logits"] + layout.present_outputs, feeds)
        return outputs[0][:, -1], outputs[1:]

    def _prefill(self, requests: list[Request]) -> _Batch:
        """Run the prompts of newly admitted requests (in groups within PREFILL_TOKEN_BUDGET)."""
        joined = _Batch([], [], np.zeros((0, 0), np.int64))
        group: list[Request] = []
        for request in sorted(requests, key=lambda r: len(r.prompt_ids)):
            longest = len(request.prompt_ids)  # sorted, so the newcomer is the longest
            if group and (len(group) + 1) * longest > PREFILL_TOKEN_BUDGET:
                joined = joined.join(self._prefill_group(group))
                group = []
            group.append(request)
        return joined.join(self._prefill_group(group)) if group else joined

    def _prefill_group(self, requests: list[Request]) -> _Batch:
        length = max(len(r.prompt_ids) for r in requests)
        input_ids = np.zeros((len(requests), length), np.int64)
        mask = np.zeros((len(requests), length), np.int64)
        for row, request in enumerate(requests):
            input_ids[row, length - len(request.prompt_ids):] = request.prompt_ids
            mask[row, length - len(request.prompt_ids):] = 1
        empty = np.zeros((len(requests), self.layout.kv_heads, 0, self.layout.head_dim), self.layout.dtype)
        logits, present = self._run(input_ids, mask, [empty] * len(self.layout.past_inputs))
        # Zero the cache at padded positions so no stray value there can reach a later step.
        present = [np.where(mask[:, None, :, None] == 1, p, 0).astype(p.dtype) for p in present]
        for row, request in enumerate(requests):
            self._accept(request, sample(logits[row], request.params, request.rng))
        return _Batch(list(requests), present, mask)

    def _decode(self, batch: _Batch) -> _Batch:
        input_ids = np.array([[r.pending] for r in batch.requests], np.int64)
        mask = np.concatenate([batch.mask, np.ones((len(batch), 1), np.int64)], axis=1)
        logits, present = self._run(input_ids, mask, batch.past)
        for row, request in enumerate(batch.requests):
            self._accept(request, sample(logits[row], request.params, request.rng))
        return _Batch(batch.requests, present, mask)

    def _retire(self, batch: _Batch) -> _Batch:
        """Drop finished rows, and finish cancelled or timed-out ones (freeing their slots)."""
        now = time.monotonic()
        for request in batch.requests:
            reason = None if request.finished else request._expired(now)
            if reason:
                self._finish(request, reason)
        return batch.keep([i for i, r in enumerate(batch.requests) if not r.finished])

    def _accept(self, request: Request, token: int) -> None:
        """Record a sampled token, stream its text, and finish the request when it is done."""
        if request.finished:
            return
        if token in self.eos_ids and not request.params.ignore_eos:
            self._finish(request, "stop")
            return
        request.generated.append(token)
        request.pending = token
        text = self.tokenizer.decode(request.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        finish = None
        stops = request.params.stop
        if stops:
            start = max(0, request.sent_chars - max(len(s) for s in stops))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and (
            len(request.generated) >= request.params.max_tokens
            or len(request.prompt_ids) + len(request.generated) >= self.context_length
        ):
            finish = "length"
        upto = len(text) if finish else len(text) - _held_back(text, stops)
        delta = text[request.sent_chars: upto] if upto > request.sent_chars else ""
        request.sent_chars = max(request.sent_chars, upto)
        if finish:
            self._finish(request, finish, delta, [token])
        else:
            request.sink(Chunk(delta, [token], None, len(request.prompt_ids), len(request.generated)))

    def _finish(self, request: Request, reason: str, text: str = "", token_ids: Optional[list[int]] = None, error: Optional[str] = None) -> None:
        if request.finished:
            return
        request.finished = True
        request.sink(Chunk(text, token_ids or [], reason, len(request.prompt_ids), len(request.generated), error))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not to stream yet: a partial UTF-8 character or stop string."""
    if text.endswith("\ufffd"):
        return 1
    for size in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-size:]) for s in stops):
            return size
    return 0


# -- command line ---------------------------------------------------------------------------


def _add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="most new tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from an exported model with ONNX Runtime",
        description="Stream a completion of PROMPT from an exported model directory (chat template applied when the tokenizer has one).",
    )
    parser.add_argument("model_dir", help="directory written by `armquant export` (model.onnx, tokenizer, config)")
    parser.add_argument("prompt", help="the prompt, or - to read it from stdin")
    _add_sampling_arguments(parser, temperature=0.0)
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    parser.set_defaults(handler=_generate_command)


def _generate_command(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed, tuple(args.stop))
    with Engine(args.model_dir, max_batch_size=1, max_queue=1, threads=args.threads) as engine:
        if engine.tokenizer.chat_template and not args.raw:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
            ids = engine.chat_prompt(messages)
        else:
            ids = engine.encode(prompt)
        start = time.perf_counter()
        for chunk in engine.stream(ids, params):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        seconds = time.perf_counter() - start
        sys.stdout.write("\n")
        print(
            f"[{chunk.completion_tokens} tokens in {seconds:.2f} s, {chunk.completion_tokens / seconds:.1f} tokens/s, "
            f"finish: {chunk.finish_reason}]",
            file=sys.stderr,
        )
        if chunk.finish_reason == "error":
            raise RuntimeError(chunk.error)
    return 0
