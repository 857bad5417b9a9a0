"""Where a GPU decode step's time goes: kernels of one graph replay of the 8B-shaped target
(Triton kernels with and without programmatic dependent launch, and graphs of PyTorch ops), or of
a prompt's prefill. Usage: PYTHONPATH=src python3 scripts/gpu_profile.py [layers | prefill]"""
from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
from gpu_bench import llama  # noqa: E402

from specdec.kernels import gpu_kernels  # noqa: E402
from specdec.backends.graph_decoder import graph_decoder_for  # noqa: E402
from specdec.backends.hf import HFCausalLM  # noqa: E402


def event_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def prefill_profile() -> None:
    """Kernels of a 512-token prompt's prefill (eager: too many rows for a graph step)."""
    model = llama("8b", 128256, 0, decisive=True)
    decoder = graph_decoder_for(HFCausalLM(model, "8b", eos_token_ids=set()), 1024)
    prompt = torch.randint(2, 1000, (511,), device="cuda")
    print(f"prefill of 511 tokens: {event_ms(lambda: decoder.prefill(prompt, decoder.new_cache()), 10):.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.prefill(prompt, decoder.new_cache())
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))


def main() -> None:
    if sys.argv[1:] == ["prefill"]:
        return prefill_profile()
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    model = llama("8b", 128256, 0, layers=layers, decisive=True)
    for kernels, pdl in ((True, True), (True, False), (False, False)):
        # programmatic dependent launch between the Triton kernels (Hopper), on and off
        os.environ["SPECDEC_GPU_PDL"] = "1" if pdl else "0"
        gpu_kernels._chained.cache_clear()
        decoder = graph_decoder_for(HFCausalLM(model, "8b", eos_token_ids=set()), 1024, kernels=kernels)
        cache = decoder.new_cache()
        decoder.prefill(torch.randint(2, 1000, (512,), device="cuda"), cache)
        for n in (1, 5):
            tokens = torch.full((n,), 5, device="cuda")

            def step(decoder=decoder, cache=cache, tokens=tokens, n=n):
                decoder.forward(tokens, cache, n)
                decoder.rewind(cache, 512)

            print(f"\nkernels={kernels}, pdl={pdl and gpu_kernels._chained()}, {layers} layers, {n} positions: "
                  f"graph step {event_ms(step):.3f} ms", flush=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        del decoder, cache, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
