"""Start a real `specdec serve` process on a free loopback port for the tests."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import httpx

from specdec.server.background import free_port


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None, timeout: float = 120.0):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "specdec.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not come up")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


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
