"""`specdec serve --replicas 2` on Ray Serve over loopback: requests are spread, a replica killed
mid-load loses only its own requests, and the rest go on (server/replicas.py)."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import openai
import pytest

from server_util import server_process, stop_under_load, wait_until_serving


MODEL = "replicated"
PROMPTS = ["the quick brown fox", "def add(a, b):", "speculative decoding drafts tokens", "the lazy dog"]


def replica_of(response: httpx.Response) -> str:
    return response.headers["x-specdec-replica"]


def wait_for_replicas(base: str, count: int, timeout: float = 120.0) -> set[str]:
    """Poll /health until `count` distinct replicas have answered."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as client:
        while len(seen) < count:
            assert time.monotonic() < deadline, f"only replicas {seen} came up"
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for response in pool.map(lambda _: client.get(f"{base}/health"), range(8)):
                    if response.status_code == 200:
                        seen.add(replica_of(response))
    return seen


@pytest.fixture(scope="module")
def replicated(slow_model_dir):
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    # The slow model (no EOS): a request runs to max_tokens and stays in flight for seconds.
    with server_process("--target", str(slow_model_dir), "--served-model-name", MODEL, "--replicas", "2",
                        "--max-concurrency", "4", "--drain-timeout", "30", timeout=180) as (base, proc):
        wait_until_serving(base, MODEL)
        yield base, wait_for_replicas(base, 2), proc


def test_replica_settings_follow_the_flags_and_bad_ones_are_refused():
    from specdec.errors import SpecDecError
    from specdec.server.replicas import replica_settings, threads_per_replica

    fixed = replica_settings("3", 1, 4, max_concurrency=8, max_queue=64, drain_timeout_s=20)
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 72
    assert fixed["graceful_shutdown_timeout_s"] == 20 and "autoscaling_config" not in fixed
    auto = replica_settings("auto", 2, 6, max_concurrency=8, max_queue=64, drain_timeout_s=60)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (2, 6, 8)
    for replicas, low, high in (("0", 1, 4), ("two", 1, 4), ("auto", 3, 2), ("auto", 0, 2)):
        with pytest.raises(SpecDecError):
            replica_settings(replicas, low, high, 8, 64, 60)
    assert [threads_per_replica(n, cores=8) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]


@pytest.mark.heavy
def test_requests_are_spread_over_the_replicas_and_each_gives_the_same_greedy_text(replicated):
    base, replicas, _ = replicated
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(i: int) -> tuple[str, str, str]:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)],
                                                          max_tokens=12, temperature=0)
        return PROMPTS[i % len(PROMPTS)], raw.headers["x-specdec-replica"], raw.parse().choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(32)))
    assert {replica for _, replica, _ in answers} == replicas  # both served
    by_prompt: dict[str, set[str]] = {}
    for prompt, _, text in answers:
        by_prompt.setdefault(prompt, set()).add(text)
    assert all(len(texts) == 1 for texts in by_prompt.values()), by_prompt  # one engine's output, twice
    scraped = httpx.get(f"{base}/metrics")
    assert f'specdec_replica_info{{replica="{replica_of(scraped)}"}} 1.0' in scraped.text


@pytest.mark.heavy
def test_a_replica_killed_mid_load_loses_only_its_own_requests_and_the_rest_go_on(replicated):
    base, _, _ = replicated
    started: dict[int, str] = {}

    def stream(i: int) -> tuple[str, bool]:
        """(replica, whether the stream ran to its end)"""
        body = {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 160, "temperature": 0,
                "stream": True}
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
                started[i] = replica_of(response)
                finish = None
                for line in response.iter_lines():
                    if line.startswith("data: ") and '"finish_reason": "length"' in line:
                        finish = "length"
                return started[i], finish == "length"
        except httpx.HTTPError:
            return started.get(i, "?"), False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, i) for i in range(8)]
        deadline = time.monotonic() + 60
        while len(started) < len(futures):  # every stream is running on a replica, both replicas busy
            assert time.monotonic() < deadline and not any(f.done() for f in futures), started
            time.sleep(0.05)
        assert len(set(started.values())) == 2, started
        victim = started[0]
        os.kill(int(victim), signal.SIGKILL)  # a crash, not a drain
        results = [f.result(timeout=180) for f in futures]
    survivors = [(replica, done) for replica, done in results if replica != victim]
    assert survivors and all(done for _, done in survivors), results  # the other replica's all finished
    assert not all(done for replica, done in results if replica == victim)  # the victim's were cut off
    # The proxy routes new requests to the live replica (and Ray starts a new one).
    deadline = time.monotonic() + 60
    while True:
        response = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 4,
                                                               "temperature": 0}, timeout=60)
        if response.status_code == 200:
            break
        assert time.monotonic() < deadline, response.text
        time.sleep(0.5)
    assert replica_of(response) != victim


def test_a_stopped_server_lets_its_replicas_finish_their_streams_then_exits(replicated):
    """Last in this module: it stops the module's server. SIGTERM drains the replicas (Ray Serve
    stops each gracefully while its proxy still carries the streams) before Ray shuts down."""
    base, _, proc = replicated
    ends, exit_s = stop_under_load(proc, base, MODEL, streams=4, max_tokens=160)
    assert ends == ["length"] * 4, ends
    assert proc.returncode == 0 and exit_s < 60, (proc.returncode, exit_s)
