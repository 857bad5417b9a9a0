"""Stopping `specdec serve` (SIGTERM, as a supervisor or Kubernetes does): the requests in flight
finish, streams included, no new ones are taken, and the process exits; past --drain-timeout
the rest are cut rather than waited for. A real server process over a tiny model with no EOS
(each request runs to max_tokens), driven over loopback."""
from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time

import httpx

from server_util import server_process, stop_under_load, wait_until_serving

MODEL = "stopping"


def test_a_stopped_server_finishes_its_streams_takes_no_new_requests_and_exits(slow_model_dir):
    with server_process("--target", str(slow_model_dir), "--served-model-name", MODEL, "--max-concurrency", "4",
                        "--drain-timeout", "60") as (base, proc):
        wait_until_serving(base, MODEL)
        refused: list[str] = []

        def knock() -> None:  # a new request during the drain
            time.sleep(0.3)
            try:
                refused.append(str(httpx.post(f"{base}/v1/completions", timeout=10,
                                              json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code))
            except httpx.HTTPError as error:
                refused.append(type(error).__name__)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            knocked = pool.submit(lambda: (time.sleep(0.5), knock()))
            ends, _ = stop_under_load(proc, base, MODEL, streams=3, max_tokens=160)
            knocked.result(timeout=30)
    assert ends == ["length"] * 3  # each ran to its max_tokens after the signal
    assert refused == ["ConnectError"]  # the listener closed at the signal
    assert proc.returncode in (0, -signal.SIGTERM)


def test_a_drain_longer_than_its_timeout_cuts_the_streams_and_exits(slow_model_dir):
    with server_process("--target", str(slow_model_dir), "--served-model-name", MODEL, "--max-concurrency", "4",
                        "--drain-timeout", "1") as (base, proc):
        wait_until_serving(base, MODEL)
        ends, exit_s = stop_under_load(proc, base, MODEL, streams=2, max_tokens=480)  # ~5 s of tokens each
    assert "length" not in ends, ends  # cut after the drain's second, not waited for
    assert exit_s < 20, exit_s


def test_a_negative_drain_timeout_is_refused_in_one_line(slow_model_dir):
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "serve", "--target", str(slow_model_dir),
                           "--drain-timeout", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--drain-timeout" in proc.stderr and "Traceback" not in proc.stderr
