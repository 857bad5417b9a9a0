"""`specdec bench --soak SECONDS`: a real server under a long streaming load with hang-ups.

Many clients stream requests back to back over loopback for the whole time; a share of them
hang up mid-stream on purpose. At the end the server must have lost nothing (every request
not hung up on finished with its text), leaked nothing (nothing running or queued, every
backend sequence slot free), and kept answering. Greedy text is compared with the same
request made alone before the load.
"""
from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

SOAK_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Speculative decoding is a technique that",
                "Once upon a time, in a small village,", "The three primary colours are")


@dataclass
class SoakResult:
    seconds: float
    streams: int
    disconnect_rate: float
    requests: int = 0
    completed: int = 0
    disconnected: int = 0  # hung up on purpose
    lost: int = 0  # neither completed nor hung up on: a refusal, an error, a hang, a broken stream
    errors: dict[str, int] = field(default_factory=dict)  # what the lost ones got
    identical_to_alone: int = 0  # completed greedy texts equal to the same request alone
    tokens: int = 0
    latencies_s: list[float] = field(default_factory=list, repr=False)
    running_after: float = -1
    queued_after: float = -1
    leaked_slots: int | None = None  # backend sequence slots not free once idle (None: no slots to count)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        latencies = sorted(self.latencies_s)
        data["tokens_per_s"] = round(self.tokens_per_s, 1)
        if latencies:
            data["latency_p50_s"] = round(statistics.median(latencies), 3)
            data["latency_p95_s"] = round(latencies[int(0.95 * (len(latencies) - 1))], 3)
        return data

    def lines(self) -> list[str]:
        s = self.summary()
        return [
            f"soak: {self.streams} streams for {self.seconds:.0f} s, {self.disconnect_rate:.0%} hung up on purpose",
            f"  requests {self.requests}: completed {self.completed}, hung up {self.disconnected}, "
            f"lost {self.lost} {self.errors or ''}",
            f"  completed greedy text equal to the request alone: {self.identical_to_alone}/{self.completed}",
            f"  after: running {self.running_after:.0f}, queued {self.queued_after:.0f}, leaked slots "
            f"{'n/a' if self.leaked_slots is None else self.leaked_slots}",
            f"  {s['tokens_per_s']} tok/s; latency p50 {s.get('latency_p50_s')} s, p95 {s.get('latency_p95_s')} s",
        ]


def soak(engine, seconds: float, streams: int = 32, disconnect_rate: float = 0.2, max_tokens: int = 48,
         seed: int = 0, prompts: tuple[str, ...] = SOAK_PROMPTS) -> SoakResult:
    """Run the load against a server on this engine (`specdec serve`'s app, in this process)."""
    from ..server.app import ServerConfig, create_app
    from ..server.background import serve_in_thread

    slots = engine.target.max_sequences
    config = ServerConfig(model_name="soak", max_running=min(streams, slots or streams), max_waiting=2 * streams)
    app = create_app(engine, config)
    result = SoakResult(seconds=seconds, streams=streams, disconnect_rate=disconnect_rate)
    with serve_in_thread(app) as base:
        expected = {p: _stream(base, p, max_tokens, hang_up_after=None)[1] for p in prompts}
        tally, lock = Counter(), threading.Lock()
        deadline = time.monotonic() + seconds
        started = time.monotonic()

        def client(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline:
                prompt = rng.choice(prompts)
                hang_up = rng.randrange(1, 6) if rng.random() < disconnect_rate else None
                began = time.monotonic()
                outcome, text, tokens = _stream(base, prompt, max_tokens, hang_up)
                with lock:
                    result.requests += 1
                    if outcome == "completed":
                        result.completed += 1
                        result.tokens += tokens
                        result.latencies_s.append(time.monotonic() - began)
                        result.identical_to_alone += text == expected[prompt]
                    elif outcome == "disconnected":
                        result.disconnected += 1
                    else:
                        result.lost += 1
                        tally[outcome] += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 600)
        result.lost += sum(t.is_alive() for t in threads)  # a client still waiting: a hung request
        result.seconds = time.monotonic() - started
        result.errors = dict(tally)
        result.running_after, result.queued_after, free = _idle_state(base)
        if slots is not None and free is not None:
            result.leaked_slots = int(slots - free)
    return result


def _stream(base: str, prompt: str, max_tokens: int, hang_up_after: int | None) -> tuple[str, str, int]:
    """("completed" | "disconnected" | what went wrong, text, completion tokens)."""
    body = {"model": "soak", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, tokens = [], 0
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            if response.status_code != 200:
                return f"http {response.status_code}", "", 0
            for i, line in enumerate(response.iter_lines()):
                if hang_up_after is not None and i >= hang_up_after:
                    return "disconnected", "", 0
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "completed", "".join(text), tokens
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return f"stream error {chunk['error'].get('code')}", "", 0
                text.append(chunk["choices"][0]["text"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return f"client error {type(exc).__name__}", "", 0
    return "stream ended without [DONE]", "", 0


def _idle_state(base: str, wait_s: float = 30.0) -> tuple[float, float, float | None]:
    """running, queued and free slots once the server has settled (or after wait_s)."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + wait_s
    while True:
        values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
                  for s in f.samples}
        running, queued = values["specdec_running_requests"], values["specdec_queue_depth"]
        if (running == 0 and queued == 0) or time.monotonic() > deadline:
            return running, queued, values.get("specdec_free_sequences")
        time.sleep(0.2)
