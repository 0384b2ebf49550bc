"""An OpenAI-compatible HTTP server over the generation engine, and the `armquant serve` command.

Endpoints: POST /v1/completions and /v1/chat/completions (`stream: true` gives server-sent
events), GET /v1/models, /health and /metrics (Prometheus). Bad requests get 400 with an
OpenAI-style error body naming the problem; a full queue gets 503 with Retry-After, so memory
stays bounded; a request that runs past the timeout gets 504 (or an error event when streaming);
a client that disconnects frees its batch slot at the next decode step.
"""


import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from armquant.cli import positive_int
from armquant.generate import Chunk, Engine, EngineClosed, QueueFull, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class HTTPError(Exception):
    """An error answered as an OpenAI-style JSON body with this status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _request_models():
    """Pydantic request bodies (built on first use so that importing this module stays cheap)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class StreamOptions(Strict):
        include_usage: bool = False

    class Sampling(Strict):
        model: Optional[str] = None
        max_tokens: Optional[int] = None
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0  # top_k and ignore_eos are not in the OpenAI API; named as in vLLM
        ignore_eos: bool = False
        seed: Optional[int] = None
        stop: Union[str, list[str], None] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        n: int = Field(1, ge=1, le=1, description="only one choice per request")
        user: Optional[str] = None

    class CompletionRequest(Sampling):
        prompt: Union[str, list[int]]

    class TextPart(Strict):
        type: Literal["text"]
        text: str

    class Message(Strict):
        role: Literal["system", "user", "assistant", "developer"]
        content: Union[str, list[TextPart]]
        name: Optional[str] = None

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: Optional[int] = None

    return CompletionRequest, ChatRequest


class _Metrics:
    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("armquant_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("armquant_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("armquant_completion_tokens", "generated tokens", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("armquant_request_latency_seconds", "request latency to the last byte", ["endpoint"], buckets=buckets, registry=r)
        self.first_token = Histogram("armquant_time_to_first_token_seconds", "latency to the first generated token", buckets=buckets, registry=r)
        Gauge("armquant_queue_depth", "requests waiting for a batch slot", registry=r).set_function(lambda: engine.queue_depth)
        Gauge("armquant_active_requests", "requests in the running batch", registry=r).set_function(lambda: engine.active)

    def done(self, endpoint: str, status: int, start: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - start)


def _validation_message(error: dict, fields: list[str]) -> tuple[str, Optional[str]]:
    location = [str(p) for p in error.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    kind = error.get("type")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error.get('msg'))}); send a JSON object", None
    if kind == "extra_forbidden":
        return f"unknown field {param!r}; accepted fields are {', '.join(fields)}", param
    if kind == "missing":
        return f"field {param!r} is required", param
    if not location:
        return f"the request body must be a JSON object ({error.get('msg')})", None
    return f"field {param!r}: {error.get('msg')} (given {error.get('input')!r})", param


def create_app(engine: Engine, *, model_name: Optional[str] = None, request_timeout: float = 60.0, owns_engine: bool = False):
    """The FastAPI application serving `engine`; with owns_engine it closes the engine on shutdown
    (after the server has let in-flight requests finish), else close it yourself."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    CompletionRequest, ChatRequest = _request_models()
    model_name = model_name or Path(engine.model_dir).resolve().name
    created = int(time.time())
    metrics = _Metrics(engine)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if owns_engine:
            await asyncio.to_thread(engine.close, False)

    app = FastAPI(title="armquant", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        body_model = ChatRequest if request.url.path.endswith("chat/completions") else CompletionRequest
        message, param = _validation_message(exc.errors()[0], sorted(body_model.model_fields))
        metrics.done(request.url.path, 400, time.perf_counter())
        return JSONResponse(HTTPError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": engine.queue_depth, "active": engine.active}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "armquant"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _respond(body, request, "/v1/completions", lambda: engine.encode(body.prompt), _first_given(body.max_tokens, 16), _completion_format)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [
            {"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in body.messages
        ]
        max_tokens = _first_given(body.max_completion_tokens, body.max_tokens, engine.context_length)
        return await _respond(body, request, "/v1/chat/completions", lambda: engine.chat_prompt(messages), max_tokens, _chat_format)

    async def _respond(body, request, endpoint: str, prompt_ids: Callable[[], list[int]], max_tokens: int, fmt: "_Format"):
        start = time.perf_counter()
        try:
            if body.model is not None and body.model != model_name:
                raise HTTPError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}", param="model", code="model_not_found")
            try:
                stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
                params = SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, stop, body.ignore_eos)
            except ValueError as error:
                raise HTTPError(400, str(error), param=str(error).split("=")[0]) from None
            try:
                ids = prompt_ids()
                engine.check_prompt(ids)
            except ValueError as error:
                code = "context_length_exceeded" if "context length" in str(error) else None
                raise HTTPError(400, str(error), param="messages" if fmt is _chat_format else "prompt", code=code) from None
            chunks, submitted = _submit(ids, params)
        except HTTPError as error:
            metrics.done(endpoint, error.status, start)
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(chunks, submitted, fmt, include_usage, endpoint, start)
            return _StreamingResponse(events, on_close=submitted.cancel, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, last = await _collect(chunks, submitted, request, start)
        except HTTPError as error:
            metrics.done(endpoint, error.status, start)
            raise
        finally:
            submitted.cancel()
        metrics.done(endpoint, 200, start)
        return fmt(_new_id(fmt), model_name, text, last, final=True, stream=False)

    def _submit(ids: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()

        def sink(chunk: Chunk) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        try:
            submitted = engine.submit(ids, params, sink, timeout=request_timeout)
        except QueueFull as error:
            raise HTTPError(503, f"server overloaded: {error}", kind="server_overloaded", code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineClosed as error:
            raise HTTPError(503, str(error), kind="server_shutting_down", headers={"Retry-After": "1"}) from None
        return chunks, submitted

    async def _next(chunks: asyncio.Queue, start: float) -> Chunk:
        # The engine times requests out; this only guards against an engine that stopped answering.
        left = request_timeout + 5.0 - (time.perf_counter() - start)
        try:
            return await asyncio.wait_for(chunks.get(), timeout=max(left, 0.1))
        except asyncio.TimeoutError:
            return Chunk("", [], "timeout")

    def _account(chunk: Chunk, first: bool, start: float) -> None:
        if first and chunk.token_ids:
            metrics.first_token.observe(time.perf_counter() - start)
        metrics.completion_tokens.inc(len(chunk.token_ids))
        if chunk.finish_reason is not None:
            metrics.prompt_tokens.inc(chunk.prompt_tokens)

    def _failure(chunk: Chunk) -> Optional[HTTPError]:
        if chunk.finish_reason == "timeout":
            return HTTPError(504, f"the request did not finish within the server's {request_timeout:g} s timeout; ask for fewer max_tokens or retry later", kind="timeout")
        if chunk.finish_reason == "error":
            return HTTPError(500, f"generation failed: {chunk.error}", kind="server_error")
        if chunk.finish_reason == "cancelled":
            return HTTPError(503, "the request was cancelled because the server is shutting down", kind="server_shutting_down")
        return None

    async def _collect(chunks: asyncio.Queue, submitted, request: Request, start: float) -> tuple[str, Chunk]:
        """The whole text, checking twice a second for a client that went away meanwhile."""
        parts, first, checked = [], True, time.perf_counter()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.get(), timeout=0.5)
            except asyncio.TimeoutError:
                chunk = None
            if time.perf_counter() - checked >= 0.5:
                checked = time.perf_counter()
                if await request.is_disconnected():
                    submitted.cancel()
                    raise HTTPError(499, "client closed the request", kind="client_closed")
            if chunk is None:
                if time.perf_counter() - start > request_timeout + 5.0:  # the engine stopped answering
                    raise _failure(Chunk("", [], "timeout"))
                continue
            _account(chunk, first, start)
            first = first and not chunk.token_ids
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                failure = _failure(chunk)
                if failure:
                    raise failure
                return "".join(parts), chunk

    async def _sse(chunks: asyncio.Queue, submitted, fmt: "_Format", include_usage: bool, endpoint: str, start: float) -> AsyncIterator[str]:
        status, first = 200, True
        request_id = _new_id(fmt)
        try:
            if fmt is _chat_format:
                yield _event(fmt(request_id, model_name, None, None, final=False, stream=True))
            while True:
                chunk = await _next(chunks, start)
                _account(chunk, first, start)
                first = first and not chunk.token_ids
                failure = _failure(chunk)
                if failure:
                    status = failure.status
                    yield _event(failure.body())
                    break
                if chunk.text or chunk.finish_reason:
                    yield _event(fmt(request_id, model_name, chunk.text, chunk, final=chunk.finish_reason is not None, stream=True))
                if chunk.finish_reason is not None:
                    if include_usage:
                        usage = {"id": request_id, "object": fmt.chunk_object, "created": int(time.time()), "model": model_name, "choices": [], "usage": _usage(chunk)}
                        yield _event(usage)
                    break
            yield "data: [DONE]\n\n"
        except BaseException:
            status = 499  # client went away (the response task was cancelled)
            raise
        finally:
            submitted.cancel()
            metrics.done(endpoint, status, start)

    return app


def _first_given(*values):
    return next(v for v in values if v is not None)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(chunk: Chunk) -> dict:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens, "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def _new_id(fmt) -> str:
    return f"{fmt.id_prefix}-{uuid.uuid4().hex[:24]}"


class _Format:
    """OpenAI response shapes of one endpoint, whole and streamed."""

    def __init__(self, id_prefix: str, whole_object: str, chunk_object: str, choice: Callable[[Optional[str], bool, bool], dict]):
        self.id_prefix, self.whole_object, self.chunk_object, self.choice = id_prefix, whole_object, chunk_object, choice

    def __call__(self, request_id: str, model: str, text: Optional[str], chunk: Optional[Chunk], *, final: bool, stream: bool) -> dict:
        choice = self.choice(text, final, stream)
        choice["finish_reason"] = chunk.finish_reason if final and chunk else None
        body: dict[str, Any] = {
            "id": request_id,
            "object": self.chunk_object if stream else self.whole_object,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
        if not stream:
            body["usage"] = _usage(chunk)
        return body


def _completion_choice(text, final, stream):
    return {"index": 0, "text": text or "", "logprobs": None}


def _chat_choice(text, final, stream):
    if not stream:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
    if text is None:  # the opening event names the role
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
    return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None}


_completion_format = _Format("cmpl", "text_completion", "text_completion", _completion_choice)
_chat_format = _Format("chatcmpl", "chat.completion", "chat.completion.chunk", _chat_choice)


def _streaming_response_class():
    from starlette.responses import StreamingResponse

    class StreamingWithClose(StreamingResponse):
        """A stream that runs `on_close` however it ends: finished, failed or client gone."""

        def __init__(self, content, *, on_close: Callable[[], None], **kwargs):
            super().__init__(content, **kwargs)
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return StreamingWithClose


def _StreamingResponse(content, *, on_close, **kwargs):
    return _streaming_response_class()(content, on_close=on_close, **kwargs)


# -- running the server ---------------------------------------------------------------------


def build_server(
    engine: Engine,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model_name: Optional[str] = None,
    request_timeout: float = 60.0,
    shutdown_timeout: float = 30.0,
    log_level: str = "info",
    owns_engine: bool = False,
):
    """A uvicorn server for `engine`: `.run()` blocks; SIGINT/SIGTERM let in-flight requests finish
    for up to `shutdown_timeout` seconds, then cancel them (their engine slots are freed)."""
    import uvicorn

    app = create_app(engine, model_name=model_name, request_timeout=request_timeout, owns_engine=owns_engine)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout, access_log=False)
    return uvicorn.Server(config)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an exported model over an OpenAI-compatible HTTP API",
        description="Serve MODEL_DIR (written by `armquant export`) on ONNX Runtime with /v1/completions, "
        "/v1/chat/completions, /v1/models, /health and /metrics.",
    )
    parser.add_argument("model_dir", help="directory written by `armquant export` (model.onnx, tokenizer, config)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--model-name", default=None, help="model id in the API (default: the directory name)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 503 (default 64)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds a request may take (default 60)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on shutdown (default 30)")
    parser.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    parser.set_defaults(handler=_serve_command)


def _serve_command(args) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"armquant serve needs {', '.join(missing)}; install them with: pip install 'armquant[serve]'")
    engine = Engine(args.model_dir, max_batch_size=args.max_batch_size, max_queue=args.max_queue, threads=args.threads)
    server = build_server(
        engine, host=args.host, port=args.port, model_name=args.model_name,
        request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout, owns_engine=True,
    )
    # On SIGINT/SIGTERM uvicorn stops accepting, waits for in-flight requests, closes the engine
    # (lifespan), then re-raises the signal so the process ends as signalled.
    server.run()
    return 0
