"""Run every configuration on every prompt, interleaved so that machine drift hits all alike."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from ..engine import Engine
from .ideal import ideal_speedup
from .runs import BenchRun, RunResult
from .workloads import WorkloadPrompt

BASELINE = "specdec-plain"


@dataclass
class Measurement:
    prompt_id: str
    category: str
    run: str
    kind: str
    repeat: int
    wall_time_s: float
    tokens: int
    identical_to_baseline: bool | None
    compute_flops: float | None
    peak_memory_mb: float
    stats: dict[str, Any] | None = None


@dataclass
class BenchResults:
    config: dict[str, Any]
    runs: list[str]
    measurements: list[Measurement] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "runs": self.runs, "summary": summarize(self),
                "against_peers": against_peers(self), "measurements": [asdict(m) for m in self.measurements]}


def run_benchmark(engine: Engine, runs: list[BenchRun], prompts: list[WorkloadPrompt], max_new_tokens: int,
                  repeats: int, temperature: float, seed: int, config: dict[str, Any],
                  progress: bool = True) -> BenchResults:
    assert runs[0].name == BASELINE, "the baseline runs first"
    encoded = [encode_prompt(engine, p) for p in prompts]
    for run in runs:  # warm-up: first-call costs (allocations, lazy init) stay out of the numbers
        run(encoded[0], min(8, max_new_tokens), temperature, seed, **_constraint(run, prompts[0]))
    results = BenchResults(config=config, runs=[r.name for r in runs])
    bar = tqdm(total=len(prompts) * repeats * len(runs), desc="bench", unit="run", disable=not progress)
    for prompt, ids in zip(prompts, encoded):
        for repeat in range(repeats):
            # rotate the order (baseline kept first) so no configuration always runs right after another
            order = [runs[0]] + _rotate(runs[1:], repeat)
            baseline_ids: list[int] | None = None
            for run in order:
                bar.update()
                if prompt.response_format is not None and run.kind == "peer":
                    continue  # the peers measured here take no response_format
                bar.set_postfix_str(f"{prompt.id} / {run.name}", refresh=False)
                result = run(ids, max_new_tokens, temperature, seed + repeat, **_constraint(run, prompt))
                if run.name == BASELINE:
                    baseline_ids = result.token_ids
                results.measurements.append(_measurement(prompt, run, repeat, result, baseline_ids, temperature))
    bar.close()
    return results


def _measurement(prompt: WorkloadPrompt, run: BenchRun, repeat: int, result: RunResult,
                 baseline_ids: list[int] | None, temperature: float) -> Measurement:
    identical = result.token_ids == baseline_ids if temperature == 0 and baseline_ids is not None else None
    stats = result.stats.to_dict() if result.stats is not None else None
    if stats is not None:
        stats.pop("provenance", None)
    return Measurement(prompt.id, prompt.category, run.name, run.kind, repeat, result.wall_time_s,
                       len(result.token_ids), identical, result.compute_flops, result.peak_memory_mb, stats)


def _rotate(items: list, by: int) -> list:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def _constraint(run: BenchRun, prompt: WorkloadPrompt) -> dict[str, Any]:
    """The prompt's response_format, for the runs that take one (specdec's own)."""
    return {} if prompt.response_format is None or run.kind == "peer" else {"response_format": prompt.response_format}


def encode_prompt(engine: Engine, prompt: WorkloadPrompt) -> list[int]:
    return engine.encode_chat(prompt.messages) if prompt.messages else engine.encode(prompt.prompt)


def summarize(results: BenchResults) -> list[dict[str, Any]]:
    """One row per (run, category), plus category 'all'. Ratios are against the baseline on the same prompts."""
    rows = []
    categories = sorted({m.category for m in results.measurements}) + ["all"]
    for run in results.runs:
        for category in categories:
            row = _summary_row(results, run, category)
            if row:
                rows.append(row)
    return rows


def _summary_row(results: BenchResults, run: str, category: str) -> dict[str, Any] | None:
    def select(name):
        return [m for m in results.measurements if m.run == name and (category == "all" or m.category == category)]

    mine, base = select(run), select(BASELINE)
    if not mine:
        return None
    prompt_ids = sorted({m.prompt_id for m in mine})
    latency = {p: statistics.median(m.wall_time_s for m in mine if m.prompt_id == p) for p in prompt_ids}
    base_latency = {p: statistics.median(m.wall_time_s for m in base if m.prompt_id == p) for p in prompt_ids}
    ratios = [latency[p] / base_latency[p] for p in prompt_ids]
    tokens = sum(m.tokens for m in mine)
    time_total = sum(m.wall_time_s for m in mine)
    row: dict[str, Any] = {
        "run": run, "category": category, "prompts": len(prompt_ids),
        "median_latency_s": statistics.median(latency.values()),
        "latency_ratio": statistics.median(ratios),
        "speedup": 1.0 / statistics.median(ratios),
        "tokens_per_s": tokens / time_total if time_total else 0.0,
        "identical": _fraction([m.identical_to_baseline for m in mine]),
        "peak_memory_mb": max(m.peak_memory_mb for m in mine),
    }
    stats = [m.stats for m in mine if m.stats is not None]
    if stats:
        drafted = sum(s["drafted_tokens"] for s in stats)
        accepted = sum(s["accepted_tokens"] for s in stats)
        passes = sum(s["target_forward_passes"] for s in stats)
        generated = sum(s["generated_tokens"] for s in stats)
        row.update(
            acceptance_rate=accepted / drafted if drafted else None,
            mean_accepted_length=generated / passes if passes else None,
            target_passes_per_token=passes / generated if generated else None,
            per_position_acceptance=_per_position(stats),
        )
        row.update(_ideal(results.config, run, row["acceptance_rate"], row["speedup"]))
    flops, base_flops = [m.compute_flops for m in mine], [m.compute_flops for m in base]
    if all(f is not None for f in flops) and base_flops and all(f is not None for f in base_flops):
        base_tokens = sum(m.tokens for m in base)
        known = tokens and base_tokens and sum(base_flops)
        row["compute_ratio"] = (sum(flops) / tokens) / (sum(base_flops) / base_tokens) if known else None
    return row


def _ideal(config: dict[str, Any], run: str, acceptance: float | None, speedup: float) -> dict[str, float]:
    verify, draft_ms = config.get("verify_cost_ms"), config.get("draft_cost_ms", {})
    if not verify or acceptance is None or run not in draft_ms:
        return {}
    ideal = ideal_speedup(acceptance, verify, draft_ms[run], config.get("draft_lengths", {}).get(run))
    return {"ideal_speedup": ideal, "of_ideal": speedup / ideal}


def _per_position(stats: list[dict[str, Any]]) -> list[float]:
    width = max((len(s["per_position_drafted"]) for s in stats), default=0)
    drafted, accepted = [0] * width, [0] * width
    for s in stats:
        for i, (d, a) in enumerate(zip(s["per_position_drafted"], s["per_position_accepted"])):
            drafted[i] += d
            accepted[i] += a
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]


def _fraction(flags: list[bool | None]) -> float | None:
    known = [f for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def against_peers(results: BenchResults) -> list[dict[str, Any]]:
    """Per prompt, each peer's median time per token over each specdec run's (speedup over the
    peer, prompt by prompt): the median and the least over prompts, per run and peer. Time per
    token, since a peer's greedy output may end at another length (its kernels round near-ties
    apart)."""
    per_token: dict[tuple[str, str], list[float]] = {}
    kinds: dict[str, str] = {}
    for m in results.measurements:
        if m.tokens:
            per_token.setdefault((m.prompt_id, m.run), []).append(m.wall_time_s / m.tokens)
            kinds[m.run] = m.kind
    prompts = list(dict.fromkeys(prompt for prompt, _ in per_token))
    peers = [run for run in results.runs if kinds.get(run) == "peer"]
    rows = []
    for run in (r for r in results.runs if kinds.get(r) != "peer"):
        for peer in peers:
            ratios = [statistics.median(per_token[(p, peer)]) / statistics.median(per_token[(p, run)])
                      for p in prompts if (p, peer) in per_token and (p, run) in per_token]
            if ratios:
                rows.append({"run": run, "peer": peer, "median": statistics.median(ratios), "least": min(ratios),
                             "prompts": len(ratios)})
    return rows
