"""Admit requests, step the running generations as one batch on one owner thread, stream results back.

The event loop never runs model code, nor touches a backend: handlers validate a request and
submit its `Generation`, which holds no cache yet. Everything that calls into a model — taking
a sequence's cache (`Generation.open`), the batched steps, handing caches back
(`Generation.close`) — happens on this scheduler's one thread: llama.cpp and the GPU pool are
not safe across threads.

Admission: a request is refused at `submit` when it could never run (400: its positions are
more than the backend's shared cache holds) or when `max_waiting` are already waiting (429).
A waiting request holds nothing. It is admitted, in arrival order, once a running slot is
free and its positions (prompt + max_tokens, reserved whole, so a running request never runs
out of cache) fit in what the running ones leave of the shared cache.

Supervision: a fault outside any one request's guards (batching.py isolates those) ends the
requests of that step with a 500 and the loop goes on; each request has a deadline, after
which it ends with a 504. If the thread itself dies, every waiting handler gets a 503 and
`/health` says so.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from ..batching import BatchStepper
from ..errors import InvalidRequestError
from ..generation import Generation, GenerationOutput, StepOutput
from .metrics import ServerMetrics

log = logging.getLogger("specdec.server")


class QueueFullError(Exception):
    """Every waiting place is taken: retry later (HTTP 429)."""


class RequestFailed(Exception):
    """Why the server ended a request early, as an HTTP status and an OpenAI error type."""

    def __init__(self, status: int, message: str, type_: str = "server_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code


@dataclass
class RequestHandle:
    generation: Generation
    loop: asyncio.AbstractEventLoop
    request_id: str = ""
    deadline: float | None = None  # time.monotonic() by which it must finish
    arrived: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StepOutput | RequestFailed
    first_token_at: float | None = None
    output: GenerationOutput | None = None  # set before the finishing step is delivered
    reserved_cells: int = 0  # shared-cache positions held while running
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    async def next_event(self, timeout: float) -> StepOutput | RequestFailed | None:
        """The next step (or failure), or None if nothing arrived within `timeout` seconds."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def _deliver(self, item: StepOutput | RequestFailed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()


class Scheduler:
    def __init__(self, metrics: ServerMetrics, stepper: BatchStepper, max_running: int = 8,
                 max_waiting: int = 64, kv_cells: int | None = None) -> None:
        """kv_cells: cache positions that all running sequences share (llama.cpp's unified
        cache); None where each sequence's cache is its own."""
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.metrics = metrics
        self.stepper = stepper
        self.max_running, self.max_waiting = max_running, max_waiting
        self.kv_cells = kv_cells
        self._reserved = 0  # cells the running requests hold
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[RequestHandle] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._dead: str | None = None  # why the thread ended, if it did while serving
        self._thread = threading.Thread(target=self._supervised, name="specdec-scheduler", daemon=True)

    # ---- the handlers' side (event-loop thread) -------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def failure(self) -> str | None:
        """Why the scheduler cannot serve, or None while it can."""
        if self._dead is not None:
            return self._dead
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stopped:
            return "the scheduler thread has stopped"
        return None

    def submit(self, generation: Generation, loop: asyncio.AbstractEventLoop, request_id: str = "",
               timeout_s: float | None = None) -> RequestHandle:
        cells = generation.max_length
        if self.kv_cells is not None and cells > self.kv_cells:
            raise InvalidRequestError(
                f"prompt + max_tokens is {cells} positions, more than this server's cache holds for all requests "
                f"together ({self.kv_cells}); it can never run here", "max_tokens")
        handle = RequestHandle(generation, loop, request_id,
                               deadline=None if timeout_s is None else time.monotonic() + timeout_s)
        with self._wake:
            failure = self.failure
            if failure is not None:
                raise RequestFailed(503, f"the server cannot take requests: {failure}", code="server_unavailable")
            self._drop_cancelled_waiting()
            if len(self._running) + len(self._waiting) >= self.max_running + self.max_waiting:
                raise QueueFullError(
                    f"server is at capacity ({self.max_running} running, {self.max_waiting} waiting); retry later")
            self._waiting.append(handle)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()
        return handle

    @property
    def load(self) -> tuple[int, int]:
        with self._wake:
            return len(self._running), len(self._waiting)

    # ---- the owner thread ------------------------------------------------------------------
    def _supervised(self) -> None:
        try:
            while self._round():
                pass
        except BaseException as exc:  # a fault in the supervision itself: nothing can step now
            log.critical("the scheduler thread died", exc_info=True)
            self._dead = f"the scheduler thread died ({type(exc).__name__})"
        finally:
            with self._wake:
                ended = list(self._running) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
            reason = self._dead or "the server is shutting down"
            for handle in ended:
                self._end(handle, RequestFailed(503, reason, code="server_unavailable"))
            self._publish_load()

    def _round(self) -> bool:
        """Admit what fits, then one batched step of every running request. False: stop."""
        with self._wake:
            while not self._stopped and not self._running and not self._waiting:
                self._wake.wait()
            if self._stopped:
                return False
            self._drop_cancelled_waiting()
            expired = [h for h in self._waiting if h.expired]
            for handle in expired:
                self._waiting.remove(handle)
            while self._waiting and self._admissible_now(self._waiting[0].generation.max_length):
                handle = self._waiting.popleft()
                handle.reserved_cells = handle.generation.max_length
                self._reserved += handle.reserved_cells
                self._running.append(handle)
            batch = list(self._running)
        self._publish_load()
        for handle in expired:
            self._end(handle, request_timed_out())
        try:
            done = self._advance(batch)
        except Exception:
            # The batch's shared state (caches mid-pass) cannot be trusted: end its requests,
            # hand their caches back, and go on with the next arrivals.
            log.exception("a batch step failed outside any one request's guard: ending its %d requests",
                          len(batch))
            self.metrics.scheduler_faults.inc()
            done = {id(h): RequestFailed(500, "the engine failed on this step; the request was ended",
                                         code="engine_fault") for h in batch}
        ended = [h for h in batch if id(h) in done]
        with self._wake:
            self._running = [h for h in self._running if id(h) not in done]
            for handle in ended:
                self._reserved -= handle.reserved_cells
        for handle in ended:
            self._end(handle, done[id(handle)])
        self._publish_load()
        return True

    def _advance(self, batch: list[RequestHandle]) -> dict[int, RequestFailed | None]:
        """One batched step of every live request; returns those now done, by id, with the
        failure each ends with (None: finished, or its client is gone)."""
        done: dict[int, RequestFailed | None] = {}
        for handle in batch:
            if handle.cancelled:
                self.metrics.cancelled.inc()
                done[id(handle)] = None
            elif handle.expired:
                done[id(handle)] = request_timed_out()
        live = [h for h in batch if id(h) not in done]
        results = self.stepper.step([h.generation for h in live]) if live else []
        for handle, result in zip(live, results):
            if isinstance(result, BaseException):  # that request alone fails (batching.py logged it)
                log.error("request %s failed in the engine: %s: %s", handle.request_id, type(result).__name__, result)
                done[id(handle)] = RequestFailed(500, f"the engine failed on this request (id {handle.request_id}); "
                                                      "the server log has the details", code="engine_error")
                continue
            if handle.first_token_at is None and result.token_ids:
                handle.first_token_at = time.perf_counter()
                self.metrics.time_to_first_token.observe(handle.first_token_at - handle.arrived)
            if result.finished:
                handle.output = handle.generation.output()
                self.metrics.record_finished(handle.generation.stats, time.perf_counter() - handle.arrived)
                done[id(handle)] = None
            handle._deliver(result)
        return done

    def _end(self, handle: RequestHandle, failure: RequestFailed | None) -> None:
        """Hand the request's caches back (here, on the owner thread) and tell its handler why."""
        try:
            handle.generation.close()
        except Exception:  # a backend that cannot free a slot must not stop the others
            log.exception("closing request %s failed", handle.request_id)
        if failure is not None:
            handle._deliver(failure)

    def _admissible_now(self, cells: int) -> bool:
        if len(self._running) >= self.max_running:
            return False
        return self.kv_cells is None or self._reserved + cells <= self.kv_cells

    def _drop_cancelled_waiting(self) -> None:
        """Waiting requests whose clients left: they hold nothing, so they just go."""
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            self.metrics.cancelled.inc()

    def _publish_load(self) -> None:
        with self._wake:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._running))
        free = self.stepper.target.free_sequences  # read here, on the owner thread
        if free is not None:
            self.metrics.free_sequences.set(free)


def request_timed_out() -> RequestFailed:
    return RequestFailed(504, "the request did not finish within the server's --request-timeout",
                         type_="timeout_error", code="request_timeout")
