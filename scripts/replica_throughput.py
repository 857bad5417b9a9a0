"""Throughput of `specdec serve --replicas N` against one replica, closed loop over loopback.

For each N in --replicas it starts the server (Ray Serve), keeps --concurrency streaming clients
busy until --requests have finished, and prints a table (tok/s, latency p50/p95, errors); repeats
--rounds times with the N interleaved. Prints JSON with --json.
Usage: python scripts/replica_throughput.py --replicas 1,2 --concurrency 8 --requests 48 --rounds 3
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_util import running_server, wait_until_serving  # noqa: E402

from specdec.bench.workloads import load_workload  # noqa: E402


def one_round(base: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    def ask(i: int) -> tuple[int, float]:
        started = time.monotonic()
        body = {"model": "m", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"], time.monotonic() - started

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, range(requests)))
    elapsed = time.monotonic() - started
    latencies = sorted(latency for _, latency in results)
    return {"tok_s": sum(tokens for tokens, _ in results) / elapsed, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args, server_args = p.parse_known_args()
    prompts = [w.prompt for w in load_workload("all") if w.prompt]
    counts = [int(n) for n in args.replicas.split(",")]
    rows: dict[int, list[dict]] = {n: [] for n in counts}
    for round_ in range(args.rounds):
        for n in counts if round_ % 2 == 0 else reversed(counts):
            with running_server("--served-model-name", "m", "--replicas", str(n), *server_args, timeout=300) as base:
                wait_until_serving(base, "m")
                one_round(base, prompts, args.concurrency, args.concurrency, args.max_tokens)  # warm-up
                rows[n].append(one_round(base, prompts, args.concurrency, args.requests, args.max_tokens))
            print(f"round {round_ + 1}, {n} replica(s): {rows[n][-1]}", file=sys.stderr)
    summary = {n: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for n, runs in rows.items()}
    if args.json:
        print(json.dumps({"summary": summary, "rounds": rows}, indent=1))
        return
    base_rate = summary[counts[0]]["tok_s"]
    print("| replicas | tok/s (median) | vs first | latency p50 s | p95 s |\n|---|---|---|---|---|")
    for n, row in summary.items():
        print(f"| {n} | {row['tok_s']:.1f} | {row['tok_s'] / base_rate:.2f}x | {row['p50_s']:.2f} | {row['p95_s']:.2f} |")


if __name__ == "__main__":
    main()
