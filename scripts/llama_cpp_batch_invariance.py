"""How often plain greedy decoding on llama.cpp gives the same tokens in a batch as alone.

llama.cpp's CPU kernels round differently with the batch's shape (its feed widths, how many
sequences share the pass), so a request's greedy output can depend on what runs beside it,
with no drafting at all. This sizes that for the default model, for comparison with the
`identical` column of `specdec bench --serve` (speculative against plain, both batched).
Usage: python scripts/llama_cpp_batch_invariance.py [OUT.json]
"""
import json
import sys

import specdec
from specdec.bench.runner import _encode
from specdec.bench.serving import serve
from specdec.bench.workloads import load_workload

engine = specdec.load()
prompts = [_encode(engine, p) for p in load_workload("all")]
plain = engine.with_drafter("none")
plain.reserve_sequences(16)
batch = [prompts[i % len(prompts)] for i in range(16)]
outputs = {load: serve(plain, batch, 64, load)[1] for load in (1, 2, 4, 8, 16)}
rows = []
for load in (2, 4, 8, 16):
    same = sum(a == b for a, b in zip(outputs[1], outputs[load]))
    rows.append({"load": load, "identical_to_alone": same / len(batch)})
    print(f"plain decoding at load {load}: {same}/{len(batch)} requests identical to the same request alone")
if len(sys.argv) > 1:
    json.dump({"target": engine.target.name, "max_new_tokens": 64, "requests": len(batch), "rows": rows},
              open(sys.argv[1], "w"), indent=1)
