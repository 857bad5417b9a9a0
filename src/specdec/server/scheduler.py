"""Admit requests, step the running generations as one batch on one worker thread, stream results back.

The event loop never runs model code: handlers submit a `Generation` and await its steps.
At most `max_running` generations advance at once, together: each round is one batched
step (batching.py: every sequence drafts, one target pass verifies them all), so the
weights are read once per round, not once per request. Up to `max_waiting` more wait in
a bounded queue, and beyond that a request is refused at once (HTTP 429). Requests join
and leave between rounds; a cancelled request (client gone) is dropped at the next one.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from ..batching import BatchStepper
from ..generation import Generation, StepOutput
from .metrics import ServerMetrics


class QueueFullError(Exception):
    pass


@dataclass
class RequestHandle:
    generation: Generation
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StepOutput | BaseException
    first_token_at: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def next_event(self, timeout: float) -> StepOutput | BaseException | None:
        """The next step (or error), or None if nothing arrived within `timeout` seconds."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def _deliver(self, item: StepOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()


class Scheduler:
    def __init__(self, metrics: ServerMetrics, stepper: BatchStepper, max_running: int = 8,
                 max_waiting: int = 64) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.metrics = metrics
        self.stepper = stepper
        self.max_running, self.max_waiting = max_running, max_waiting
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[RequestHandle] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="specdec-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, generation: Generation, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        handle = RequestHandle(generation, loop)
        with self._wake:
            if len(self._running) + len(self._waiting) >= self.max_running + self.max_waiting:
                raise QueueFullError(
                    f"server is at capacity ({self.max_running} running, {self.max_waiting} waiting); retry later"
                )
            self._waiting.append(handle)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()
        return handle

    @property
    def load(self) -> tuple[int, int]:
        with self._wake:
            return len(self._running), len(self._waiting)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._running and not self._waiting:
                    self._wake.wait()
                if self._stopped:
                    return
                while self._waiting and len(self._running) < self.max_running:
                    self._running.append(self._waiting.popleft())
                self.metrics.queue_depth.set(len(self._waiting))
                self.metrics.running.set(len(self._running))
                batch = list(self._running)
            finished = self._advance(batch)
            if finished:
                with self._wake:
                    self._running = [h for h in self._running if h not in finished]
                    self.metrics.running.set(len(self._running))

    def _advance(self, batch: list[RequestHandle]) -> list[RequestHandle]:
        """One batched step of every live request; returns those that are done (finished,
        failed or cancelled)."""
        done = [handle for handle in batch if handle.cancelled]
        for _ in done:
            self.metrics.cancelled.inc()
        live = [handle for handle in batch if not handle.cancelled]
        results = self.stepper.step([handle.generation for handle in live]) if live else []
        for handle, result in zip(live, results):
            if isinstance(result, BaseException):  # that request alone fails (batching.py logged it)
                handle._deliver(result)
                done.append(handle)
                continue
            if handle.first_token_at is None and result.token_ids:
                handle.first_token_at = time.perf_counter()
                self.metrics.time_to_first_token.observe(handle.first_token_at - handle.arrived)
            handle._deliver(result)
            if result.finished:
                self.metrics.record_finished(handle.generation.stats, time.perf_counter() - handle.arrived)
                done.append(handle)
        return done
