"""Start a real `specdec serve` process on a free loopback port for the tests."""
from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from specdec.server.background import free_port


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None, timeout: float = 120.0):
    """`specdec serve ARGS` until the block ends: yields its base URL."""
    with server_process(*args, env=env, timeout=timeout) as (base, _):
        yield base


@contextlib.contextmanager
def server_process(*args: str, env: dict | None = None, timeout: float = 120.0):
    """`running_server`, yielding (base URL, the process) for tests that signal it."""
    port = free_port()
    # Its output goes to a file, not a pipe: a pipe nobody reads fills up (Ray's replicas log
    # every request) and then blocks the server.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "specdec.cli", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited early:\n{log.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not come up")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def serving(engine, config):
    """`create_app(engine, config)` under uvicorn in this process, on a free loopback port:
    yields the base URL and the app (its scheduler is `app.state.scheduler`)."""
    from specdec.server.app import create_app
    from specdec.server.background import serve_in_thread

    app = create_app(engine, config)
    with serve_in_thread(app) as base:
        yield base, app


def metric_samples(base: str) -> dict[tuple[str, tuple], float]:
    """Every Prometheus sample the server exposes, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text) for s in family.samples}


def wait_until_serving(base: str, model: str, timeout: float = 60.0) -> None:
    """Until a completion succeeds: Ray Serve's proxy answers /health from a replica before it
    knows every route (a POST may get 405 for a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "a", "max_tokens": 1},
                                  timeout=30)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base} does not serve completions")
        time.sleep(0.5)


STOP_PROMPTS = ["the quick brown fox", "def add(a, b):", "speculative decoding drafts tokens"]


def stream_to_end(base: str, model: str, i: int, max_tokens: int, started: dict[int, float]) -> str:
    """A streamed completion's end: "length" when it ran to max_tokens, else what cut it."""
    body = {"model": model, "prompt": STOP_PROMPTS[i % len(STOP_PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            started[i] = time.monotonic()
            finish = "no finish"
            for line in response.iter_lines():
                if line.startswith("data: ") and '"finish_reason": "length"' in line:
                    finish = "length"
            return finish
    except httpx.HTTPError as error:
        return type(error).__name__


def stop_under_load(proc: subprocess.Popen, base: str, model: str, streams: int,
                    max_tokens: int) -> tuple[list[str], float]:
    """SIGTERM to a server process while `streams` streams run: (how each ended, seconds from the
    signal to the process's exit)."""
    started: dict[int, float] = {}
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(stream_to_end, base, model, i, max_tokens, started) for i in range(streams)]
        deadline = time.monotonic() + 60
        while len(started) < streams:  # every stream has its response headers: all are in flight
            assert time.monotonic() < deadline and not any(f.done() for f in futures), started
            time.sleep(0.02)
        assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ends = [f.result(timeout=120) for f in futures]
    proc.wait(timeout=120)
    return ends, time.monotonic() - signalled
