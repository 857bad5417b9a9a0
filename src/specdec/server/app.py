"""The OpenAI-compatible HTTP API over an `Engine`: request -> validation -> scheduler -> stream."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..errors import InvalidRequestError, SpecDecError
from ..generation import Generation, GenerationOutput, StepOutput
from ..token_logprobs import TokenLogprob
from ..sampling_params import SamplingParams
from ..stats import GenerationStats
from . import protocol
from .metrics import ServerMetrics
from .scheduler import QueueFullError, RequestFailed, RequestHandle, Scheduler, request_timed_out

log = logging.getLogger("specdec.server")

MAX_CHOICES = 16  # n per request: each choice is a sequence of its own in the batch
POLL_S = 0.25  # how often a waiting response checks whether its client is still there
STUCK_GRACE_S = 10.0  # past its deadline, a response stops waiting for a scheduler that does not answer
FIELD_NAMES = {"max_new_tokens": "max_tokens"}  # engine names -> OpenAI names in errors


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_running: int = 8
    max_waiting: int = 64
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout_s: float | None = 600.0  # None: no deadline

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0 or self.max_body_bytes < 1:
            raise SpecDecError("max running must be >= 1, max waiting >= 0, max body bytes >= 1")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise SpecDecError("the request timeout must be > 0 seconds")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)


OPEN_PATHS = ("/health", "/metrics")  # for probes and scrapers; everything else needs the key


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics()
    scheduler = Scheduler(metrics, engine.batch_stepper, config.max_running, config.max_waiting,
                          kv_cells=engine.shared_kv_cells)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.engine = scheduler, metrics, engine
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes, metrics=metrics)
    _install_error_handlers(app, metrics)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                metrics.count(endpoint_label(request), 401)
                return _error(APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                                       code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        running, waiting = scheduler.load
        failure = scheduler.failure
        body = {"status": "ok" if failure is None else "unavailable", "model": config.model_name,
                "drafter": engine.drafter_name, "running": running, "waiting": waiting}
        if failure is not None:
            return JSONResponse({**body, "reason": failure}, status_code=503)
        return body

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "specdec", "max_model_len": engine.max_context}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def respond(request: Request, body: protocol._Sampling, start: Callable[[SamplingParams], Generation],
                      default_max_tokens: int, kind: str):
        """Submit one request and answer it whole or as a stream; `kind` is "completion" or "chat"."""
        rid = protocol.new_id("cmpl" if kind == "completion" else "chatcmpl")
        params = _sampling_params(body, default_max_tokens)
        submit = (start, scheduler, params, body.n or 1, rid, config.request_timeout_s, asyncio.get_running_loop())
        # A grammar compiles off the event loop (the first one also builds the tokenizer's
        # grammar form: seconds for a large vocabulary), so other requests' streams go on.
        handles = (await _off_the_loop(_submit_choices, *submit) if params.response_format is not None
                   else _submit_choices(*submit))
        model, drafter = config.model_name, engine.drafter_name
        shape = protocol.completion_logprobs if kind == "completion" else protocol.chat_logprobs

        def logprobs(values: list[TokenLogprob] | None) -> dict[str, Any] | None:
            return None if values is None else shape(values, engine.token_text)

        if not body.stream:
            outs = await _collect(handles, request, scheduler)
            metrics.count(endpoint_label(request), 200)
            build = protocol.completion_response if kind == "completion" else protocol.chat_response
            return build(rid, model, outs, drafter, [logprobs(out.logprobs) for out in outs])

        def chunk(index: int, step: StepOutput, out: GenerationOutput | None) -> dict[str, Any]:
            stats, finish = (out.stats if out else None), (step.finish_reason if out else None)
            if kind == "completion":
                return protocol.completion_chunk(rid, model, step.text, finish, stats, drafter,
                                                 logprobs(step.logprobs), index)
            return protocol.chat_chunk(rid, model, {"content": step.text} if step.text else {}, finish, stats,
                                       drafter, logprobs(step.logprobs), index)

        def usage(outs: list[GenerationOutput]) -> dict[str, Any]:
            return protocol.usage_chunk(rid, model, kind, GenerationStats.of_choices([o.stats for o in outs]),
                                        drafter)

        first = None if kind == "completion" else [protocol.chat_chunk(
            rid, model, {"role": "assistant", "content": ""}, None, index=i) for i in range(len(handles))]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        label = endpoint_label(request)
        return _sse(handles, request, scheduler, chunk, first=first or [], usage=usage if include_usage else None,
                    counted=lambda status: metrics.count(label, status))

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        _check_request(body, config)
        prompt = _completion_prompt(body.prompt)
        return await respond(request, body, lambda params: engine.start(prompt, params),
                             protocol.DEFAULT_COMPLETION_MAX_TOKENS, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest, request: Request):
        _check_request(body, config)
        messages = [{"role": m.role, "content": _text(m.text(), "messages")} for m in body.messages]
        if not any(m["content"] for m in messages):
            raise InvalidRequestError("messages have no content", "messages")
        return await respond(request, body, lambda params: engine.start_chat(messages, params),
                             protocol.DEFAULT_CHAT_MAX_TOKENS, "chat")

    return app


def endpoint_label(request: Request) -> str:
    """The metrics' endpoint label: the matched route's template, never a client's raw path
    (each distinct path would add a time series)."""
    route = request.scope.get("route")
    return route.path if route is not None else path_label(request.app, request.url.path)


def path_label(app: FastAPI, path: str) -> str:
    """A path's label before routing: the route it names, else "unmatched"."""
    return path if any(getattr(route, "path", None) == path for route in app.routes) else "unmatched"


# ---- request handling ------------------------------------------------------------------------
def _check_request(body: protocol._Sampling, config: ServerConfig) -> None:
    if body.model != config.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}",
                       param="model", code="model_not_found")
    field = body.unsupported()
    if field is not None:
        raise APIError(400, f"{field!r} is not supported by this server; leave it out or at its default",
                       param=field, code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def _text(value: str, field: str) -> str:
    """Text that can become tokens: JSON may carry lone UTF-16 surrogates, which cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{field} holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text",
                                  field) from None
    return value


def _completion_prompt(prompt: str | list[int] | list[str]) -> str | list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise InvalidRequestError("only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        _text(prompt, "prompt")
    return prompt


def _sampling_params(body: protocol._Sampling, default_max_tokens: int) -> SamplingParams:
    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be from 1 to {MAX_CHOICES}", "n")
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    for s in stop:
        _text(s, "stop")
    try:
        return SamplingParams(
            max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0, seed=body.seed, num_draft_tokens=body.num_draft_tokens, stop=stop,
            logprobs=body.requested_logprobs(), presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0, logit_bias=body.token_biases(),
            response_format=body.response_format)
    except InvalidRequestError as exc:
        raise _with_openai_field(exc) from None


def _with_openai_field(exc: InvalidRequestError) -> InvalidRequestError:
    """The same error, naming the field as the client sent it (max_tokens, not max_new_tokens)."""
    if exc.field not in FIELD_NAMES:
        return exc
    field = FIELD_NAMES[exc.field]
    return InvalidRequestError(str(exc).replace(exc.field, field), field)


def _submit_choices(start: Callable[[SamplingParams], Generation], scheduler: Scheduler, params: SamplingParams,
                    n: int, rid: str, timeout_s: float | None, loop: asyncio.AbstractEventLoop) -> list[RequestHandle]:
    """A request's n choices, each its own sequence in the batch. A seeded request's choice i
    samples with seed + i: distinct, and each reproducible alone. If one cannot be queued, none is."""
    handles: list[RequestHandle] = []
    try:
        for i in range(n):
            choice = params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
            handles.append(_submit(start, scheduler, choice, rid if n == 1 else f"{rid}-{i}", timeout_s, loop))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


async def _off_the_loop(submit: Callable[..., list[RequestHandle]], *args) -> list[RequestHandle]:
    """`submit(*args)` on a worker thread. If this request is cancelled meanwhile (its client
    left), the handles the thread still makes are cancelled, not left holding slots."""
    future = asyncio.ensure_future(asyncio.to_thread(submit, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def cancel(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                for handle in done.result():
                    handle.cancel()
        future.add_done_callback(cancel)
        raise


def _submit(start: Callable[[SamplingParams], Generation], scheduler: Scheduler, params: SamplingParams, rid: str,
            timeout_s: float | None, loop: asyncio.AbstractEventLoop) -> RequestHandle:
    """Validate and queue: nothing is allocated here (the scheduler's thread does that)."""
    try:
        generation = start(params)
        return scheduler.submit(generation, loop, rid, timeout_s)
    except InvalidRequestError as exc:
        raise _with_openai_field(exc) from None
    except QueueFullError as exc:
        raise APIError(429, str(exc), type_="rate_limit_error", code="server_busy") from None
    except RequestFailed as exc:
        raise _api_error(exc) from None


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


async def _events(handle: RequestHandle, request: Request, scheduler: Scheduler) -> AsyncIterator[StepOutput]:
    """The request's steps until it finishes. Raises APIError when the server ends it, and
    _ClientGone when its client leaves. A handler never waits on a scheduler that cannot
    answer: a dead one, or one stuck past the request's deadline (a hung backend call)."""
    watch = _ClientWatch(request)
    try:
        while True:
            event = await handle.next_event(POLL_S)
            if await watch.gone():
                raise _ClientGone()
            if isinstance(event, RequestFailed):
                raise _api_error(event)
            if event is not None:
                yield event
                if event.finished:
                    return
                continue
            if scheduler.failure is not None:
                raise APIError(503, f"the server cannot serve: {scheduler.failure}", type_="server_error",
                               code="server_unavailable")
            if handle.deadline is not None and time.monotonic() > handle.deadline + STUCK_GRACE_S:
                raise _api_error(request_timed_out())
    finally:
        handle.cancel()  # no-op once finished; otherwise the scheduler ends it and frees its slot


async def _choice_events(handles: list[RequestHandle], request: Request,
                         scheduler: Scheduler) -> AsyncIterator[tuple[int, StepOutput]]:
    """Every choice's steps as they come, tagged with its index. The first failure (or the
    client leaving) ends them all: `_events` cancels each handle it stops reading."""
    if len(handles) == 1:
        async for step in _events(handles[0], request, scheduler):
            yield 0, step
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for step in _events(handle, request, scheduler):
                await queue.put((index, step))
            await queue.put((index, None))
        except BaseException as exc:  # APIError, _ClientGone, or this task's cancellation
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task, handle in zip(tasks, handles):
            task.cancel()
            handle.cancel()


async def _collect(handles: list[RequestHandle], request: Request, scheduler: Scheduler) -> list[GenerationOutput]:
    try:
        async for _ in _choice_events(handles, request, scheduler):
            pass
    except _ClientGone:
        raise APIError(499, "client disconnected") from None
    return [handle.output for handle in handles]


def _sse(handles: list[RequestHandle], request: Request, scheduler: Scheduler,
         chunk: Callable[[int, StepOutput, GenerationOutput | None], dict[str, Any]],
         first: list[dict[str, Any]], usage: Callable[[list[GenerationOutput]], dict[str, Any]] | None,
         counted: Callable[[int], None]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        status = 499  # until the stream ends otherwise: a client gone, or the server stopping it
        try:
            for opening in first:
                yield _data(opening)
            async for index, step in _choice_events(handles, request, scheduler):
                if step.finished:
                    yield _data(chunk(index, step, handles[index].output))
                elif step.text or step.logprobs:
                    yield _data(chunk(index, step, None))
            if usage is not None:
                yield _data(usage([handle.output for handle in handles]))
            status = 200
            yield "data: [DONE]\n\n"
        except APIError as exc:
            status = exc.status
            yield _data(exc.body)
            yield "data: [DONE]\n\n"
        except _ClientGone:
            pass
        finally:
            counted(status)
            for handle in handles:
                handle.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _ClientGone(Exception):
    pass


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _api_error(failure: RequestFailed) -> APIError:
    return APIError(failure.status, str(failure), type_=failure.type, code=failure.code)


# ---- errors -----------------------------------------------------------------------------------
def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status)


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def count(request: Request, status: int) -> None:
        metrics.count(endpoint_label(request), status)

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
        return _error(APIError(500, "internal error; the server log has the details", type_="server_error"))


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # A union type reports its member name (e.g. 'str'); the field is the first element.
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"{'.'.join(loc)!r} is not a field this server knows; leave it out", param=param,
                        code="unsupported_parameter")
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {'.'.join(loc)!r}", param=param)
    if not loc:
        return APIError(400, f"request body must be a JSON object: {first['msg']}")
    return APIError(400, f"invalid value for {'.'.join(loc)!r}: {first['msg']}", param=param)


class _BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before they are read into memory."""

    def __init__(self, app, limit: int, metrics: ServerMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.metrics.count(path_label(scope["app"], scope["path"]), 413)
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
            self.metrics.count(path_label(scope["app"], scope["path"]), 413)
            await _send_json(send, 413, protocol.error_body(f"request body is over the limit of {self.limit} bytes",
                                                             code="body_too_large"))


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
