"""What a request joining a running batch costs the batch's step, on the GPU (#8).

Random-weight Llama-3.1-8B and Llama-3.2-1B shapes (bf16, pooled static caches, graphs captured
as `reserve_sequences` captures them). Seven running sequences each feed 4 tokens (a verify
at k = 3) while a new request brings a 255-token prompt. Medians of 15, in ms:
  batch      the batched graph over the seven feeds alone (a step without a join)
  apart      the prompt in a pass of its own (its prompt graph), then the batched graph
  together   one forward_batch holding both (the prompt joins the batch's captured pass)
as device time (CUDA events around the calls) and the host's time to launch them.

Usage (device tool): PYTHONPATH=src python3 scripts/gpu_join_cost.py; writes $OUT/gpu_join_cost.json
"""
from __future__ import annotations

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
from specdec.backends.graph_decoder import graph_decoder_for  # noqa: E402
from specdec.backends.hf import HFCausalLM  # noqa: E402

OUT = Path(os.environ.get("OUT", "gpu-out"))
VOCAB, RUNNING, CONTEXT, PROMPT, FEED, REPEATS = 128256, 7, 300, 255, 4, 15


def timed(model, calls) -> tuple[float, float]:
    """(device ms, host ms) of running `calls` once."""
    torch.cuda.synchronize()
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began = time.perf_counter()
    first.record()
    calls()
    last.record()
    host = time.perf_counter() - began
    last.synchronize()
    return first.elapsed_time(last), host * 1e3


def measure(name: str, shape: str, seed: int) -> dict:
    model = graph_decoder_for(HFCausalLM(llama(shape, VOCAB, seed, decisive=True), shape, eos_token_ids=set()), 1024)
    model.reserve_sequences(RUNNING + 1)
    generator = torch.Generator().manual_seed(seed)
    running = [model.new_cache() for _ in range(RUNNING)]
    for cache in running:
        model.prefill(torch.randint(2, VOCAB, (CONTEXT,), generator=generator), cache)
    joiner = model.new_cache()
    prompt = torch.randint(2, VOCAB, (PROMPT,), generator=generator)
    feeds = [torch.randint(2, VOCAB, (FEED,), generator=generator) for _ in running]

    def batch():
        model.forward_batch(feeds, running, [FEED] * RUNNING)

    def apart():
        model.forward(prompt, joiner, 1)
        batch()

    def together():
        model.forward_batch([prompt] + feeds, [joiner] + running, [1] + [FEED] * RUNNING)

    results = {}
    for label, calls in (("batch", batch), ("apart", apart), ("together", together)):
        samples = []
        for _ in range(REPEATS + 2):  # the first two warm up (kernel specialisations, allocator)
            samples.append(timed(model, calls))
            for cache in running:
                model.rewind(cache, CONTEXT)
            model.rewind(joiner, 0)
        device, host = zip(*samples[2:])
        results[label] = {"device_ms": statistics.median(device), "host_ms": statistics.median(host)}
        print(f"{name} {label}: device {results[label]['device_ms']:.2f} ms, host {results[label]['host_ms']:.2f} ms",
              flush=True)
    return results


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "running": RUNNING, "context": CONTEXT, "prompt": PROMPT, "feed": FEED,
              "8b": measure("8b", "8b", 0), "1b": measure("1b", "1b", 1)}
    (OUT / "gpu_join_cost.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
