"""Where a GPU decode step's time goes: kernels of one graph replay of the 8B-shaped target,
and each weight matrix's product timed alone. Usage: PYTHONPATH=src python3 scripts/gpu_profile.py [layers]"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
from gpu_bench import llama  # noqa: E402

from specdec.models.graph_decoder import graph_decoder_for  # noqa: E402
from specdec.models.hf import HFCausalLM  # noqa: E402


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


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    model = llama("8b", 128256, 0, layers=layers, decisive=True)
    decoder = graph_decoder_for(HFCausalLM(model, "8b", eos_token_ids=set()), 1024)
    cache = decoder.new_cache()
    decoder.prefill(torch.randint(2, 1000, (512,), device="cuda"), cache)
    token = torch.tensor([5], device="cuda")

    def step():
        decoder.forward(token, cache, 1)
        decoder.rewind(cache, 512)

    print(f"{layers} layers: graph step {event_ms(step):.3f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    layer = decoder._layers[0]
    total = 0.0
    for name, w in (("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up), ("down", layer.down)):
        xi = torch.randn(1, w.shape[1], device="cuda", dtype=torch.bfloat16)
        ms = event_ms(lambda: xi @ w.T)
        total += ms
        print(f"{name} {tuple(w.shape)}: {ms:.3f} ms, {w.numel() * 2 / ms / 1e9:.0f} GB/s")
    head = event_ms(lambda: x @ decoder._head.T)
    print(f"head {tuple(decoder._head.shape)}: {head:.3f} ms, {decoder._head.numel() * 2 / head / 1e9:.0f} GB/s")
    print(f"matmuls alone for 32 layers + head: {32 * total + head:.2f} ms")


if __name__ == "__main__":
    main()
