"""Control for `bench --serve` on CPU: plain decoding against itself (two identical runs, interleaved,
medians of 3), to size this machine's run-to-run noise. Usage: python scripts/serving_noise.py OUT.json
[--prompts-apart]: run a reads each joining prompt in a pass of its own (as before prompts joined the
verify pass), run b in the batch's pass, which sizes what that change does to plain decoding."""
import json
import statistics
import sys

import specdec
from specdec.batching import BatchStepper
from specdec.bench.serving import serve
from specdec.bench.workloads import load_workload
from specdec.bench.runner import _encode

engine = specdec.load()
prompts = [_encode(engine, p) for p in load_workload("all")]
runs = {"plain-a": engine.with_drafter("none"), "plain-b": engine.with_drafter("none")}
for v in runs.values():
    v.reserve_sequences(32)
apart = "--prompts-apart" in sys.argv[2:]
steppers = {n: BatchStepper(v.target, prompts_in_verify=not (apart and n == "plain-a")) for n, v in runs.items()}
warm = [prompts[i % len(prompts)] for i in range(32)]
for n, v in runs.items():
    serve(v, warm, 16, 32, stepper=steppers[n])
rows = []
for c in (4, 8, 16, 32):
    batch = [prompts[i % len(prompts)] for i in range(max(8, 2 * c))]
    tps = {n: [] for n in runs}
    for _ in range(3):
        for n, v in runs.items():
            tps[n].append(serve(v, batch, 64, c, stepper=steppers[n])[0].tokens_per_s)
    a, b = statistics.median(tps["plain-a"]), statistics.median(tps["plain-b"])
    rows.append({"concurrency": c, "plain_a": tps["plain-a"], "plain_b": tps["plain-b"], "ratio_of_medians": b / a})
    print(c, round(a, 1), round(b, 1), f"{b / a:.3f}", flush=True)
json.dump({"date": "2026-11-24", "machine": "AMD EPYC, 2 cores", "a_prompts_apart": apart, "rows": rows}, open(sys.argv[1], "w"), indent=1)
