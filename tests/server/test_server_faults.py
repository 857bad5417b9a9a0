"""The server under faults: it stays correct, answers every request, and keeps serving.

A real server (uvicorn, in this process so that a fault can be injected into its batch loop)
over a real tiny model, driven over loopback by the official openai client and by raw HTTP.
"""
from __future__ import annotations

import concurrent.futures
import random
import threading
import time

import httpx
import openai
import pytest
import torch

from specdec import Engine
from specdec.server.app import ServerConfig
from server_util import metric_samples, serving
import tiny

pytestmark = pytest.mark.heavy

MODEL = "faulty"
PROMPTS = ["the quick brown fox", "def add(a, b):", "speculative decoding drafts tokens", "the lazy dog",
           "return a + b", "the target verifies them"]
POISON = 77  # a token id whose forward pass raises: one request's own engine failure


@pytest.fixture(scope="module")
def engine():
    model = tiny.llama(seed=0, dtype=torch.float32)

    def explode(module, args):
        if bool((args[0] == POISON).any()):
            raise RuntimeError("simulated device fault: secret detail")

    model.get_input_embeddings().register_forward_pre_hook(explode)  # sees every token, prefill included
    return Engine(tiny.wrap(model, MODEL), tiny.tokenizer(), drafter="ngram")


class StepFault:
    """Makes one batched step of the scheduler raise after it ran, outside every per-request
    guard: the worst place, since the batch's caches have moved and nobody was told."""

    def __init__(self, scheduler, monkeypatch) -> None:
        self.armed = threading.Event()
        self.fired_on: int | None = None  # sequences in the step that failed
        real = scheduler.stepper.step

        def step(generations):
            results = real(generations)
            if self.armed.is_set() and len(generations) > 1:
                self.armed.clear()
                self.fired_on = len(generations)
                raise RuntimeError("injected fault in the batch loop")
            return results

        monkeypatch.setattr(scheduler.stepper, "step", step)  # the engine's stepper: put back after the test


def complete(base: str, prompt: str, max_tokens: int = 32) -> str:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def stream(base: str, prompt: str) -> tuple[str, object]:
    """("ok", text) or ("error", status or code)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stream=True))
    except openai.APIError as exc:  # an error sent inside the stream, after its 200 header
        return "error", getattr(exc, "code", None) or getattr(exc, "status_code", None)
    return "ok", text


def hang_up(base: str, times: int) -> int:
    """Open a long stream, read a few events, close the connection; `times` over. Returns how
    many were cut off mid-stream."""
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 400, "temperature": 0, "stream": True}
    cut = 0
    for _ in range(times):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= 2:
                    cut += 1
                    break
    return cut


HOSTILE = [
    b"{not json", b"[1, 2]", b'{"model": "faulty", "prompt": "\\ud800 lone"}',
    b'{"model": "faulty", "prompt": "hi", "logit_bias": {"5": 1000}}',
    b'{"model": "faulty", "prompt": "hi", "temperature": -1}',
    b'{"model": "faulty", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}',
    b'{"model": "faulty", "prompt": "hi", "surprise": 1}',
    b'{"model": "faulty", "prompt": "' + b"x" * (2 << 20) + b'"}',
]


def hostile(base: str, rounds: int) -> list[int]:
    statuses = []
    for _ in range(rounds):
        for body in HOSTILE:
            statuses.append(httpx.post(f"{base}/v1/completions", content=body, timeout=30,
                                       headers={"content-type": "application/json"}).status_code)
    return statuses


def flood(base: str, count: int) -> list[int]:
    body = {"model": MODEL, "prompt": "the lazy dog", "max_tokens": 8, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code,
                             range(count)))


def test_server_under_faults_stays_correct_and_keeps_serving(engine, monkeypatch):
    with serving(engine, ServerConfig(model_name=MODEL, max_running=1)) as (base, _):
        expected = {p: complete(base, p) for p in PROMPTS}  # each request alone, bit for bit
        flood_expected = complete(base, "the lazy dog", 8)

    with serving(engine, ServerConfig(model_name=MODEL, max_running=4, max_waiting=24,
                                      request_timeout_s=120)) as (base, app):
        fault = StepFault(app.state.scheduler, monkeypatch)
        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            streams = [pool.submit(stream, base, PROMPTS[i % len(PROMPTS)]) for i in range(24)]
            cutters = [pool.submit(hang_up, base, 4) for _ in range(3)]
            attackers = [pool.submit(hostile, base, 3)]
            time.sleep(0.3)
            fault.armed.set()
            floods = pool.submit(flood, base, 30)
            deadline = time.monotonic() + 240  # no request may hang
            outcomes = [f.result(timeout=max(1, deadline - time.monotonic())) for f in streams]
            cut = sum(f.result(timeout=max(1, deadline - time.monotonic())) for f in cutters)
            attacked = [s for f in attackers for s in f.result(timeout=max(1, deadline - time.monotonic()))]
            flooded = floods.result(timeout=max(1, deadline - time.monotonic()))

        assert fault.fired_on is not None and fault.fired_on > 1, "the fault never fired"
        # A stream ends in its text, the fault (its batch only), or a 429 once the flood fills the queue.
        errors = [o for o in outcomes if o[0] == "error"]
        assert all(o in (("error", "engine_fault"), ("error", "server_busy")) for o in errors), errors
        faulted = [o for o in errors if o[1] == "engine_fault"]
        survivors = [(PROMPTS[i % len(PROMPTS)], text) for i, (kind, text) in enumerate(outcomes) if kind == "ok"]
        assert len(survivors) >= 12
        for prompt, text in survivors:
            assert text == expected[prompt], prompt
        assert cut == 12
        assert all(400 <= s < 500 for s in attacked), attacked
        assert set(flooded) <= {200, 429, 500} and 429 in flooded, flooded
        faulted_floods = flooded.count(500)

        # Only the injected fault's own requests got a 5xx, and each was counted with its status.
        samples = metric_samples(base)
        server_errors = sum(v for (name, labels), v in samples.items()
                            if name == "specdec_requests_total" and dict(labels)["status"].startswith("5"))
        assert server_errors == len(faulted) + faulted_floods <= fault.fired_on
        assert samples[("specdec_scheduler_faults_total", ())] == 1
        assert all(dict(labels)["endpoint"] in ("/v1/completions", "/metrics", "unmatched")
                   for (name, labels) in samples if name == "specdec_requests_total")
        # Nothing left running or queued; the server answers, and as before.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            samples = metric_samples(base)
            if samples[("specdec_running_requests", ())] == 0 and samples[("specdec_queue_depth", ())] == 0:
                break
            time.sleep(0.1)
        assert samples[("specdec_running_requests", ())] == 0 and samples[("specdec_queue_depth", ())] == 0
        assert httpx.get(f"{base}/health").json() == {**httpx.get(f"{base}/health").json(), "status": "ok",
                                                      "running": 0, "waiting": 0}
        assert complete(base, PROMPTS[0]) == expected[PROMPTS[0]]
        assert complete(base, "the lazy dog", 8) == flood_expected


def test_engine_failure_is_500_for_that_request_only_without_its_details(engine):
    with serving(engine, ServerConfig(model_name=MODEL)) as (base, _):
        bad = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": [1, POISON, 5], "max_tokens": 5},
                         timeout=30)
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error"
        assert "secret" not in bad.text and "RuntimeError" not in bad.text
        with httpx.stream("POST", f"{base}/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": [1, POISON], "max_tokens": 5, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert "engine_error" in lines[-2] and lines[-1] == "data: [DONE]"
        assert complete(base, "the quick", 5)
        statuses = {dict(labels)["status"]: v for (name, labels), v in metric_samples(base).items()
                    if name == "specdec_requests_total"}
        assert statuses["500"] == 2  # the stream too, though its header said 200


def test_a_request_past_its_deadline_gets_504_and_frees_its_place(engine, monkeypatch):
    with serving(engine, ServerConfig(model_name=MODEL, max_running=1, request_timeout_s=0.5)) as (base, app):
        slow = app.state.scheduler.stepper.step

        def crawl(generations):
            time.sleep(0.05)
            return slow(generations)

        monkeypatch.setattr(app.state.scheduler.stepper, "step", crawl)
        late = httpx.post(f"{base}/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "the quick", "max_tokens": 400, "temperature": 0})
        assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout"
        monkeypatch.undo()
        assert httpx.get(f"{base}/health").json()["running"] == 0
        assert complete(base, "the quick", 4)


def test_a_dead_scheduler_turns_health_and_requests_into_503_not_hangs(engine, monkeypatch):
    with serving(engine, ServerConfig(model_name=MODEL, request_timeout_s=30)) as (base, app):
        scheduler = app.state.scheduler

        def die(_generations):
            raise SystemExit("the thread's own death, not a step's fault")  # escapes the step guard

        monkeypatch.setattr(scheduler.stepper, "step", die)
        started = time.monotonic()
        dead = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
                          timeout=30)
        assert dead.status_code == 503 and time.monotonic() - started < 10
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "died" in health.json()["reason"]
        again = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
                           timeout=30)
        assert again.status_code == 503


def test_shared_cache_cells_decide_wait_or_never_fits(engine):
    """A backend whose sequences share cache cells (llama.cpp): a request that fits waits for
    room; one larger than the whole cache is a 400 at once, never a 500 mid-generation."""
    engine.target.kv_cells = 80
    try:
        with serving(engine, ServerConfig(model_name=MODEL, max_running=4)) as (base, _):
            never = httpx.post(f"{base}/v1/completions", timeout=30,
                               json={"model": MODEL, "prompt": "the quick", "max_tokens": 100})
            assert never.status_code == 400 and "never" in never.json()["error"]["message"]
            body = {"model": MODEL, "prompt": "the quick", "max_tokens": 60, "temperature": 0}
            with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
                answers = list(pool.map(lambda _: httpx.post(f"{base}/v1/completions", json=body, timeout=60),
                                        range(3)))
            assert [a.status_code for a in answers] == [200] * 3
            assert len({a.json()["choices"][0]["text"] for a in answers}) == 1
    finally:
        del engine.target.kv_cells


def test_random_hangups_in_a_loop_leave_nothing_running(engine):
    rng = random.Random(0)
    with serving(engine, ServerConfig(model_name=MODEL, max_running=4, max_waiting=8)) as (base, _):
        body = {"model": MODEL, "prompt": "the quick", "max_tokens": 200, "temperature": 0, "stream": True}
        for _ in range(12):
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
                for i, _ in enumerate(response.iter_lines()):
                    if i >= rng.randrange(1, 6):
                        break
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{base}/health").json()["running"] == 0


def test_a_chat_template_that_refuses_the_messages_is_a_400(engine):
    strict = tiny.tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                            "{% endif %}{{ m['content'] }}{% endfor %}")
    with serving(Engine(engine.target, strict, drafter="ngram"), ServerConfig(model_name=MODEL)) as (base, _):
        refused = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "assistant", "content": "hi"}], "max_tokens": 4})
        assert refused.status_code == 400 and "alternate" in refused.json()["error"]["message"]
        assert refused.json()["error"]["param"] == "messages"
        fine = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "the quick"}], "max_tokens": 4})
        assert fine.status_code == 200
