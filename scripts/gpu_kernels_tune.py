"""Time the GPU path's kernels against what they replace, on the 8B and 1B Llama shapes:
skinny_matmul (several block shapes) against cuBLAS for 1 and 9 rows, and attention over the
live keys against the static path's masked SDPA over the whole capacity. Weights rotate
among copies that together exceed L2, as a decode step's layers do.

Usage (device tool): PYTHONPATH=src python3 scripts/gpu_kernels_tune.py  (writes $OUT/kernels_tune.json)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from specdec.kernels import gpu_kernels

OUT = Path(os.environ.get("OUT", "gpu-out"))
SHAPES = {  # name: (n, k) of the weight [n, k]
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
    "8b head": (128256, 4096), "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048),
    "1b down": (2048, 8192), "1b head": (128256, 2048),
}
CONFIGS = [(16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 4, 6), (32, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4),
           (16, 256, 2, 4), (16, 256, 8, 4), (32, 256, 8, 3)]


def _copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(2, math.ceil(200e6 / (n * k * 2)))  # >= 200 MB in all: 4x the L2
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]


def _time(fn, weights) -> float:
    """Median ms of one call, each call on the next copy of the weights."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(weights)
        fn(weights[state["i"]])

    return do_bench(call, warmup=25, rep=200, return_mode="median")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "matmul": {}, "attention": {}}
    for name, (n, k) in SHAPES.items():
        weights = _copies(n, k)
        row = {}
        for m in (1, 9):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ms = {"cublas": _time(lambda w: x @ w.T, weights)}
            ref = (x.float() @ weights[0].float().T)
            for config in CONFIGS:
                try:
                    out = gpu_kernels.skinny_matmul(x, weights[0], config=config)
                    error = ((out.float() - ref).norm() / ref.norm()).item()
                    if not error < 1e-2:
                        ms[str(config)] = f"wrong: {error:.3g}"
                        continue
                    ms[str(config)] = _time(lambda w: gpu_kernels.skinny_matmul(x, w, config=config), weights)
                except Exception as exc:  # a config the compiler refuses: record it
                    ms[str(config)] = f"{type(exc).__name__}: {str(exc)[:80]}"
            row[m] = ms
            timed = {c: t for c, t in ms.items() if isinstance(t, float) and c != "cublas"}
            best = min(timed, key=timed.get)
            gbps = n * k * 2 / (timed[best] * 1e-3) / 1e9
            print(f"{name:12s} m={m}: cublas {ms['cublas'] * 1e3:7.1f} us ({n * k * 2 / ms['cublas'] / 1e6:5.0f} GB/s)"
                  f" | best {best} {timed[best] * 1e3:7.1f} us ({gbps:5.0f} GB/s)"
                  f" | default {ms.get(str(gpu_kernels.skinny_config(n, k)), '-')}", flush=True)
        results["matmul"][name] = row
        del weights
        torch.cuda.empty_cache()

    heads, kv_heads, d, capacity = 32, 8, 128, 4096
    keys = torch.randn(kv_heads, capacity, d, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    for length in (512, 768, 2048):
        for n in (1, 5, 9):
            qkv = torch.randn(n, (heads + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16)
            start = torch.tensor(length, device="cuda")
            cos, sin = torch.randn(n, d, device="cuda"), torch.randn(n, d, device="cuda")
            fused = do_bench(lambda: (gpu_kernels.write_kv(qkv, cos, sin, keys, values, start, heads, kv_heads),
                                      gpu_kernels.attend(qkv, cos, sin, keys, values, start, heads, 0.088, None)),
                             warmup=25, rep=100, return_mode="median")
            group = heads // kv_heads
            q = torch.randn(kv_heads, group * n, d, device="cuda", dtype=torch.bfloat16)
            mask = torch.zeros(group * n, capacity, device="cuda", dtype=torch.bfloat16)
            mask[:, length + n :] = float("-inf")
            sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask),
                            warmup=25, rep=100, return_mode="median")
            results["attention"][f"{length}+{n}"] = {"fused_us": fused * 1e3, "sdpa_capacity_us": sdpa * 1e3}
            print(f"attention after {length} keys, {n} rows: fused (write + attend) {fused * 1e3:6.1f} us, "
                  f"SDPA over the capacity {sdpa * 1e3:6.1f} us", flush=True)
    (OUT / "kernels_tune.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
