"""`specdec bench --serve`: many requests at once, plain against speculative, as a server runs them.

The loop is the server's (server/scheduler.py) without HTTP: requests arrive, at most
`max_running` advance together by batched steps (batching.BatchStepper), finished ones leave
and waiting ones join between steps. Two arrival patterns:
  closed loop  `concurrency` requests in flight at all times (each finished one is replaced);
  open loop    requests arrive at random (Poisson) times at `rate` per second, seeded.
Reported per configuration: throughput (generated tokens per second of wall time), and the same
over only the steps that ran with every slot busy (the steady state a loaded server runs in: a
short closed loop also holds its start, where requests arrive together, and its drain, where the
last ones finish with slots idle; speculation staggers finishes, so its drain is longer);
per-request latency and time to first token (p50, p95; closed loop: from the request's admission,
as its client sent it then; open loop: from its arrival, so queueing counts), acceptance, and
whether each greedy output equals the plain run's output for the same request.
Pass one `stepper` per engine across runs, as a server keeps one: its k planner has learnt
the verify pass's costs.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..batching import BatchStepper
from ..engine import Engine
from ..generation import Generation
from ..sampling_params import SamplingParams
from .report import markdown_table, terminal_table


@dataclass(frozen=True)
class ServingPoint:
    run: str  # "plain" or the drafter's name
    pattern: str  # "closed" or "open"
    concurrency: int  # max requests in flight
    rate: float | None  # open loop: requests per second
    requests: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    full_tokens: int  # generated in steps with `concurrency` requests in flight
    full_tokens_per_s: float | None  # over those steps' wall time; None where no step was full
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    acceptance_rate: float | None
    mean_draft_tokens: float  # drafted tokens per sequence-step
    # Positions the target verified per generated token (plain decoding: 1.0; the prompts are
    # not counted): the target's work, which wall time on a shared machine only blurs.
    target_positions_per_token: float
    identical: float | None  # share of greedy outputs equal to the plain run's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Request:
    prompt_ids: list[int]
    arrival_s: float  # offset from the start of the run


def serve(engine: Engine, prompts: list[list[int]], max_new_tokens: int, concurrency: int,
          rate: float | None = None, temperature: float = 0.0, seed: int = 0,
          stepper: BatchStepper | None = None,
          start: Callable[[int, list[int], SamplingParams], Generation] | None = None,
          ) -> tuple[ServingPoint, list[list[int]]]:
    """Run every prompt once through the batched loop; returns the point and each request's tokens.
    start(i, prompt_ids, params): request i's generation (default: engine.start; the GPU
    script plants a per-request synthetic drafter)."""
    start = start or (lambda i, prompt_ids, params: engine.start(prompt_ids, params))
    arrivals = _arrivals(len(prompts), rate, seed)
    requests = [_Request(p, a) for p, a in zip(prompts, arrivals)]
    stepper = stepper or BatchStepper(engine.target)
    waiting, running = list(range(len(requests))), []  # running: (index, generation, started offset)
    outputs: dict[int, Any] = {}
    first_token: dict[int, float] = {}
    drafted_steps = drafted = accepted = full_tokens = 0
    full_s = 0.0
    began = last_step = time.perf_counter()
    while waiting or running:
        now = time.perf_counter() - began
        while waiting and len(running) < concurrency and requests[waiting[0]].arrival_s <= now:
            i = waiting.pop(0)
            if rate is None:  # closed loop: the client sends its next request as the last one ends
                requests[i].arrival_s = now
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                    seed=None if temperature == 0 else seed + i)
            running.append((i, start(i, requests[i].prompt_ids, params)))
        if not running:  # open loop, idle until the next arrival
            time.sleep(max(0.0, requests[waiting[0]].arrival_s - now))
            last_step = time.perf_counter()  # idle time is no step's
            continue
        results = stepper.step([g for _, g in running])
        ended = time.perf_counter()
        done_at = ended - began
        if len(running) == concurrency:  # the step's time counts from the last one's end: admissions too
            full_s += ended - last_step
            full_tokens += sum(len(r.token_ids) for r in results if not isinstance(r, BaseException))
        last_step = ended
        for (i, generation), result in zip(running, results):
            if isinstance(result, BaseException):
                raise result
            if result.token_ids and i not in first_token:
                first_token[i] = done_at
            if result.finished:
                outputs[i] = (generation.output(), done_at)
        running = [(i, g) for i, g in running if i not in outputs]
    wall = time.perf_counter() - began
    stats = [outputs[i][0].stats for i in range(len(requests))]
    for s in stats:
        drafted += s.drafted_tokens
        accepted += s.accepted_tokens
        drafted_steps += s.target_forward_passes
    latencies = [outputs[i][1] - requests[i].arrival_s for i in range(len(requests))]
    ttfts = [first_token[i] - requests[i].arrival_s for i in range(len(requests))]
    tokens = sum(s.generated_tokens for s in stats)
    positions = sum(s.target_positions for s in stats)
    point = ServingPoint(
        run="", pattern="closed" if rate is None else "open", concurrency=concurrency, rate=rate,
        requests=len(requests), generated_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
        full_tokens=full_tokens, full_tokens_per_s=full_tokens / full_s if full_tokens else None,
        latency_p50_s=_quantile(latencies, 0.5), latency_p95_s=_quantile(latencies, 0.95),
        ttft_p50_s=_quantile(ttfts, 0.5), ttft_p95_s=_quantile(ttfts, 0.95),
        acceptance_rate=accepted / drafted if drafted else None,
        mean_draft_tokens=drafted / drafted_steps if drafted_steps else 0.0,
        target_positions_per_token=positions / tokens if tokens else 0.0, identical=None,
    )
    return point, [outputs[i][0].token_ids for i in range(len(requests))]


def _arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    if rate is None:
        return [0.0] * n
    clock, rng, times = 0.0, random.Random(seed), []
    for _ in range(n):
        times.append(clock)
        clock += rng.expovariate(rate)
    return times


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


COLUMNS = [("run", "run", "{}"), ("pattern", "load", "{}"), ("concurrency", "conc", "{}"), ("rate", "req/s", "{:g}"),
           ("requests", "requests", "{}"), ("tokens_per_s", "tok/s", "{:.1f}"), ("throughput_ratio", "vs plain", "{:.2f}x"),
           ("ratio_range", "range", "{}"), ("full_tokens_per_s", "full tok/s", "{:.1f}"), ("full_ratio", "full vs plain", "{:.2f}x"),
           ("latency_p50_s", "lat p50 s", "{:.2f}"), ("latency_p95_s", "lat p95 s", "{:.2f}"),
           ("ttft_p50_s", "ttft p50 s", "{:.2f}"), ("ttft_p95_s", "ttft p95 s", "{:.2f}"),
           ("acceptance_rate", "accept", "{:.0%}"), ("mean_draft_tokens", "k/step", "{:.1f}"),
           ("target_positions_per_token", "rows/tok", "{:.2f}"),
           ("identical", "identical", "{:.0%}")]


def serving_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    return markdown_table(rows, COLUMNS) if markdown else terminal_table(rows, COLUMNS)
