"""Paired A/B of serving variants on CPU (session 16 diagnostics): many interleaved short runs, per-pair ratios.
Variants: plain, plainN (plain again), ngram, ngram-k0 (the n-gram engine with a planner that never drafts).
Usage: python paired_ab.py OUT.json LOADS PAIRS NAMES, e.g. out.json 8,16 12 plain,ngram,ngram-k0"""
import json, random, statistics, sys
import specdec
from specdec.batching import BatchStepper
from specdec.draft_length import BatchDraftPlanner
from specdec.bench.serving import serve
from specdec.bench.workloads import load_workload
from specdec.bench.runner import _encode

class Zero(BatchDraftPlanner):
    def plan(self, policies, budgets):
        return [0] * len(policies)

out, loads, pairs, names = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4].split(",")
engine = specdec.load()
prompts = [_encode(engine, p) for p in load_workload("all")]
def variant(n):
    return engine.with_drafter("none" if n.startswith("plain") else "ngram")
runs = {n: variant(n) for n in names}
for v in runs.values():
    v.reserve_sequences(32)
steppers = {n: BatchStepper(v.target, planner=Zero() if n.endswith("-k0") else None) for n, v in runs.items()}
warm = [prompts[i % len(prompts)] for i in range(32)]
for n, v in runs.items():
    serve(v, warm, 16, 32, stepper=steppers[n])
rows = []
for c in loads:
    batch = [prompts[i % len(prompts)] for i in range(max(8, 2 * c))]
    res = {n: [] for n in names}
    for r in range(pairs):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            p, toks = serve(runs[n], batch, 64, c, stepper=steppers[n])
            res[n].append({"tps": p.tokens_per_s, "full": p.full_tokens_per_s, "drafted": p.mean_draft_tokens, "tokens": toks})
    row = {"concurrency": c}
    base = res[names[0]]
    for n in names[1:]:
        ratios = [b["tps"] / a["tps"] for a, b in zip(base, res[n])]
        full = [b["full"] / a["full"] for a, b in zip(base, res[n])]
        same = statistics.mean(x == y for a, b in zip(base, res[n]) for x, y in zip(a["tokens"], b["tokens"]))
        boot = sorted(statistics.median(random.choices(ratios, k=len(ratios))) for _ in range(2000))
        row[n] = {"ratio_median": statistics.median(ratios), "ratio_mean": statistics.mean(ratios), "ci95": [boot[50], boot[1949]],
                  "full_ratio_median": statistics.median(full), "identical": same,
                  "drafted": statistics.mean(x["drafted"] for x in res[n]), "ratios": ratios}
        print(c, n, f"median {row[n]['ratio_median']:.3f} mean {row[n]['ratio_mean']:.3f} ci [{boot[50]:.3f},{boot[1949]:.3f}] full {row[n]['full_ratio_median']:.3f} ident {same:.2f} drafted {row[n]['drafted']:.3f}", flush=True)
    row["tps"] = {n: [x["tps"] for x in res[n]] for n in names}
    rows.append(row)
    json.dump({"loads": loads, "pairs": pairs, "rows": rows}, open(out, "w"), indent=1)
