"""The OpenAI-compatible HTTP API over an `Engine`: request -> validation -> scheduler -> stream."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..errors import InvalidRequestError, SpecDecError
from ..generation import GenerationOutput, StepOutput
from ..sampling_params import SamplingParams
from . import protocol
from .metrics import ServerMetrics
from ..batching import BatchStepper
from .scheduler import QueueFullError, RequestHandle, Scheduler

log = logging.getLogger("specdec.server")

POLL_S = 0.25  # how often a waiting response checks whether its client is still there
FIELD_NAMES = {"max_new_tokens": "max_tokens"}  # engine names -> OpenAI names in errors


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_running: int = 8
    max_waiting: int = 64
    api_key: str | None = None
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0 or self.max_body_bytes < 1:
            raise SpecDecError("max running must be >= 1, max waiting >= 0, max body bytes >= 1")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics()
    scheduler = Scheduler(metrics, BatchStepper(engine.target), config.max_running, config.max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.engine = scheduler, metrics, engine
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    _install_error_handlers(app, metrics)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                metrics.requests.labels(request.url.path, "401").inc()
                return _error(APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                                       code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running, waiting = scheduler.load
        return {"status": "ok", "model": config.model_name, "drafter": engine.drafter_name,
                "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "specdec", "max_model_len": engine.target.max_context}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def respond(request: Request, body: protocol._Sampling, prompt_ids: list[int], default_max_tokens: int,
                      kind: str):
        """Submit one request and answer it whole or as a stream; `kind` is "completion" or "chat"."""
        handle = _submit(engine, scheduler, prompt_ids, _sampling_params(body, default_max_tokens))
        rid = protocol.new_id("cmpl" if kind == "completion" else "chatcmpl")
        model, drafter = config.model_name, engine.drafter_name
        metrics_label = metrics.requests.labels(request.url.path, "200")
        if not body.stream:
            out = await _collect(handle, request)
            metrics_label.inc()
            build = protocol.completion_response if kind == "completion" else protocol.chat_response
            return build(rid, model, out, drafter)
        metrics_label.inc()

        def chunk(text: str, finish: str | None, out: GenerationOutput | None) -> dict[str, Any]:
            stats = out.stats if out else None
            if kind == "completion":
                return protocol.completion_chunk(rid, model, text, finish, stats, drafter)
            return protocol.chat_chunk(rid, model, {"content": text} if text else {}, finish, stats, drafter)

        first = None if kind == "completion" else protocol.chat_chunk(
            rid, model, {"role": "assistant", "content": ""}, None)
        return _sse(handle, request, chunk, first=first)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        _check_model(body.model, config)
        prompt_ids = _completion_prompt(engine, body.prompt)
        return await respond(request, body, prompt_ids, protocol.DEFAULT_COMPLETION_MAX_TOKENS, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest, request: Request):
        _check_model(body.model, config)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"] for m in messages):
            raise InvalidRequestError("messages have no content", "messages")
        prompt_ids = engine.encode_chat(messages)
        return await respond(request, body, prompt_ids, protocol.DEFAULT_CHAT_MAX_TOKENS, "chat")

    return app


# ---- request handling ------------------------------------------------------------------------
def _check_model(name: str, config: ServerConfig) -> None:
    if name != config.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                       param="model", code="model_not_found")


def _completion_prompt(engine: Engine, prompt: str | list[int] | list[str]) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise InvalidRequestError("only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    return engine.encode(prompt)


def _sampling_params(body: protocol._Sampling, default_max_tokens: int) -> SamplingParams:
    if body.n not in (None, 1):
        raise InvalidRequestError("only n=1 is supported", "n")
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0, seed=body.seed, num_draft_tokens=body.num_draft_tokens, stop=stop)
    except InvalidRequestError as exc:
        raise _with_openai_field(exc) from None


def _with_openai_field(exc: InvalidRequestError) -> InvalidRequestError:
    """The same error, naming the field as the client sent it (max_tokens, not max_new_tokens)."""
    if exc.field not in FIELD_NAMES:
        return exc
    field = FIELD_NAMES[exc.field]
    return InvalidRequestError(str(exc).replace(exc.field, field), field)


def _submit(engine: Engine, scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
    try:
        generation = engine.start(prompt_ids, params)
    except InvalidRequestError as exc:
        raise _with_openai_field(exc) from None
    try:
        return scheduler.submit(generation, asyncio.get_running_loop())
    except QueueFullError as exc:
        raise APIError(429, str(exc), type_="rate_limit_error", code="server_busy") from None


class _ClientWatch:
    """Asks the server whether the client hung up, at most every POLL_S seconds, whether or not
    steps keep arriving (a busy stream must notice a hang-up as quickly as an idle one)."""

    def __init__(self, request: Request) -> None:
        self.request, self.checked = request, time.monotonic()

    async def gone(self) -> bool:
        if time.monotonic() - self.checked < POLL_S:
            return False
        self.checked = time.monotonic()
        return await self.request.is_disconnected()


async def _collect(handle: RequestHandle, request: Request) -> GenerationOutput:
    watch = _ClientWatch(request)
    try:
        while True:
            event = await handle.next_event(POLL_S)
            if await watch.gone():
                raise APIError(499, "client disconnected")
            if event is None:
                continue
            if isinstance(event, BaseException):
                raise _engine_failure(event)
            if event.finished:
                return handle.generation.output()
    finally:
        handle.cancel()  # no-op once finished; frees the slot if the client went away


def _sse(handle: RequestHandle, request: Request,
         chunk: Callable[[str, str | None, GenerationOutput | None], dict[str, Any]],
         first: dict[str, Any] | None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        watch = _ClientWatch(request)
        try:
            if first is not None:
                yield _data(first)
            while True:
                event = await handle.next_event(POLL_S)
                if await watch.gone():
                    return
                if event is None:
                    continue
                if isinstance(event, BaseException):
                    yield _data(_engine_failure(event).body)
                    break
                step: StepOutput = event
                if step.finished:
                    yield _data(chunk(step.text, step.finish_reason, handle.generation.output()))
                    break
                if step.text:
                    yield _data(chunk(step.text, None, None))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _engine_failure(exc: BaseException) -> APIError:
    return APIError(500, f"the engine failed on this request: {type(exc).__name__}: {exc}", type_="server_error")


# ---- errors -----------------------------------------------------------------------------------
def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status)


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def count(request: Request, status: int) -> None:
        metrics.requests.labels(request.url.path, str(status)).inc()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        count(request, exc.status)
        return _error(exc)

    @app.exception_handler(SpecDecError)
    async def bad_request(request: Request, exc: SpecDecError):
        count(request, 400)
        return _error(APIError(400, str(exc), param=getattr(exc, "field", None)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        count(request, 400)
        return _error(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        count(request, exc.status_code)
        return _error(APIError(exc.status_code, str(exc.detail), type_="invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        count(request, 500)
        return _error(APIError(500, f"internal error: {type(exc).__name__}", type_="server_error"))


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # A union type reports its member name (e.g. 'str'); the field is the first element.
    param = loc[0] if loc else None
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {'.'.join(loc)!r}", param=param)
    if not loc:
        return APIError(400, f"request body must be a JSON object: {first['msg']}")
    return APIError(400, f"invalid value for {'.'.join(loc)!r}: {first['msg']}", param=param)


class _BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before they are read into memory."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, protocol.error_body(
                f"request body of {int(declared)} bytes is over the limit of {self.limit}", code="body_too_large"))
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_json(send, 413, protocol.error_body(f"request body is over the limit of {self.limit} bytes",
                                                             code="body_too_large"))


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
