"""GPU serving benchmark (#8): many requests at once, plain against speculative, in one device call.

Random-weight Llama-3.1-8B target and Llama-3.2-1B draft shapes (bf16, the static-cache path),
synthetic acceptance alpha (drafters/synthetic.py: each request's own plain greedy continuation,
each token replaced at rate 1 - alpha, the 1B draft's passes paid for real). Closed loop at each
concurrency: requests run through batching.BatchStepper as the server runs them; throughput,
latency p50/p95, acceptance; and whether every speculative output equals its plain output.

Usage (device tool): PYTHONPATH=src python3 scripts/gpu_serving.py [--quick]; writes $OUT/gpu_serving.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import llama  # noqa: E402
from specdec import SamplingParams  # noqa: E402
from specdec.batching import BatchStepper  # noqa: E402
from specdec.drafters.model import ModelDrafter  # noqa: E402
from specdec.drafters.synthetic import SyntheticDrafter  # noqa: E402
from specdec.generation import Generation  # noqa: E402
from specdec.models.graph_decoder import graph_decoder_for  # noqa: E402
from specdec.models.hf import HFCausalLM  # noqa: E402

OUT = Path(os.environ.get("OUT", "gpu-out"))


def serve(target, make_drafter, prompts, new_tokens, concurrency, stepper):
    waiting, running, done = list(range(len(prompts))), [], {}
    admitted: dict[int, float] = {}
    start = time.perf_counter()
    while waiting or running:
        while waiting and len(running) < concurrency:
            i = waiting.pop(0)
            admitted[i] = time.perf_counter()
            params = SamplingParams(max_new_tokens=new_tokens, num_draft_tokens=None)
            running.append((i, Generation(target, make_drafter(i), prompts[i], params, None)))
        results = stepper.step([g for _, g in running])
        for (i, g), r in zip(running, results):
            if isinstance(r, BaseException):
                raise r
            if r.finished:
                done[i] = (g.output(), time.perf_counter() - admitted[i])
        running = [(i, g) for i, g in running if i not in done]
    wall = time.perf_counter() - start
    outs = [done[i][0] for i in range(len(prompts))]
    drafted = sum(o.stats.drafted_tokens for o in outs)
    passes = sum(o.stats.target_forward_passes for o in outs)
    latencies = sorted(done[i][1] for i in range(len(prompts)))
    return {"tok_s": sum(len(o.token_ids) for o in outs) / wall, "wall_s": wall,
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": latencies[int(0.95 * (len(latencies) - 1))],
            "acceptance": sum(o.stats.accepted_tokens for o in outs) / drafted if drafted else None,
            "k_per_step": drafted / passes}, [o.token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--alpha", type=float, default=0.8)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    vocab, prompt_len, new_tokens = 128256, 256, (32 if args.quick else 128)
    layers = 4 if args.quick else None
    target = graph_decoder_for(HFCausalLM(llama("8b", vocab, 0, layers=layers, decisive=True), "8b",
                                          eos_token_ids=set()), 1024)
    draft = graph_decoder_for(HFCausalLM(llama("1b", vocab, 1, layers=layers, decisive=True), "1b",
                                         eos_token_ids=set()), 1024)
    torch.manual_seed(0)
    distinct = [torch.randint(2, vocab, (prompt_len,)).tolist() for _ in range(8)]
    references = []
    for p in distinct:  # each prompt's plain greedy continuation: what the synthetic draft plants
        out = Generation(target, None, p, SamplingParams(max_new_tokens=new_tokens, num_draft_tokens=0), None).run()
        references.append(p + out.token_ids)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "alpha": args.alpha,
              "new_tokens": new_tokens, "prompt_tokens": prompt_len,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    steppers = {"plain": BatchStepper(target), "speculative": BatchStepper(target)}
    for c in [int(x) for x in args.concurrency.split(",")]:
        n = max(8, 2 * c)
        prompts = [distinct[i % 8] for i in range(n)]
        makers = {"plain": lambda i: None,
                  "speculative": lambda i: SyntheticDrafter(ModelDrafter(draft), references[i % 8], args.alpha, vocab,
                                                            seed=i)}
        for name in makers:  # warm-up at this load: the planner learns this batch's verify costs
            serve(target, makers[name], prompts[: max(c, 2)], 16, c, steppers[name])
        results = {name: serve(target, makers[name], prompts, new_tokens, c, steppers[name]) for name in makers}
        plain, spec = results["plain"], results["speculative"]
        row = {"concurrency": c, "requests": n, "plain": plain[0], "speculative": spec[0],
               "ratio": spec[0]["tok_s"] / plain[0]["tok_s"], "identical": spec[1] == plain[1]}
        report["rows"].append(row)
        print(f"c={c}: plain {plain[0]['tok_s']:.0f} tok/s, speculative {spec[0]['tok_s']:.0f} tok/s "
              f"({row['ratio']:.2f}x, acceptance {spec[0]['acceptance'] or 0:.0%}, k/step {spec[0]['k_per_step']:.1f}, "
              f"identical {row['identical']})", flush=True)
        (OUT / "gpu_serving.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
