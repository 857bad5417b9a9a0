"""The speedup speculation could reach on this backend: the seed's S(alpha, k), from measured costs.

S(alpha, k) = E[tokens per pass] * T(1) / (T(k + 1) + k * t_draft), with E = (1 - alpha^(k+1)) / (1 - alpha)
for acceptance alpha independent per position, T(n) the target's cost for a pass that returns
logits at n positions (the verify-cost curve, measured here on the benchmark's own context) and
t_draft the draft's cost per drafted token. A run with adaptive k is held against the best k.
The n-gram drafter's acceptance is bursty (long runs when the text repeats), not independent,
so it can beat this ideal; a model draft's usually cannot.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

MAX_POSITIONS = 9  # k up to 8


def pass_costs(model: Any, context: list[int], max_positions: int = MAX_POSITIONS, repeats: int = 7) -> list[float]:
    """Median seconds of a pass with logits at n = 1..max_positions positions, after `context`."""
    cache = model.new_cache()
    model.prefill(torch.tensor(context), cache)
    start = model.cache_length(cache)
    probe = torch.tensor(context[-max_positions:] * max_positions)[:max_positions]
    costs = []
    for n in range(1, max_positions + 1):
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            logits = model.forward(probe[:n], cache, n)
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            times.append(time.perf_counter() - began)
            model.rewind(cache, start)
        costs.append(statistics.median(times))
    return costs


def ideal_speedup(acceptance: float, verify_costs: list[float], draft_cost: float, k: int | None) -> float:
    """S(alpha, k) at the given k, or the best over k = 1..len(verify_costs) - 1 when k is None;
    at least 1 (speculation off)."""
    ks = range(1, len(verify_costs)) if k is None else [min(k, len(verify_costs) - 1)]
    best = 1.0
    for n in ks:
        tokens = n + 1 if acceptance >= 1.0 else (1 - acceptance ** (n + 1)) / (1 - acceptance)
        best = max(best, tokens * verify_costs[0] / (verify_costs[n] + n * draft_cost))
    return best
