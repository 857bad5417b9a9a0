"""Tensor parallelism on the GPU path: the 8B-shape target split over N GPUs, against one GPU.

One process per GPU (NCCL). Each builds the same random-weight Llama-3.1-8B-shape target (bf16,
the same seed), splits it (`TensorParallelGraphDecoder`: each step's two all-reduces per layer
are captured in its CUDA graph with the rest), and times plain greedy decoding (per-token
latency) and speculative decoding with synthetic acceptance alpha at a fixed k, checking that
the speculative tokens are the plain ones. Rank 0 then times the unsplit target on its GPU, and
checks the split output against it. Results: $OUT/tensor_parallel.json and a table.

Usage (device tool, a kind with >= 2 GPUs):
    PYTHONPATH=src python3 scripts/gpu_tensor_parallel.py --world 2
Smoke test anywhere (gloo, the tiny shape, float32): python3 scripts/gpu_tensor_parallel.py --device cpu --shape tiny
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_bench import llama  # noqa: E402  (the decisive random-weight targets: see there)
from specdec import SamplingParams  # noqa: E402
from specdec.backends.graph_decoder import GraphDecoder  # noqa: E402
from specdec.backends.tensor_parallel import TensorParallelGraphDecoder  # noqa: E402
from specdec.drafters.synthetic import SyntheticDrafter  # noqa: E402
from specdec.generation import Generation  # noqa: E402

VOCAB = {"8b": 128256, "tiny": 512}


def timed(device: torch.device, run) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, out


def measure(target, prompt: list[int], args, device: torch.device) -> dict:
    """Plain and speculative runs (median of --repeats after a warm-up), per output token."""
    def plain():
        return Generation(target, None, prompt, SamplingParams(max_new_tokens=args.new_tokens, num_draft_tokens=0),
                          None).run()

    def speculative(seed: int):
        drafter = SyntheticDrafter(None, prompt + reference, args.alpha, target.vocab_size, seed=seed)
        params = SamplingParams(max_new_tokens=args.new_tokens, num_draft_tokens=args.k)
        return Generation(target, drafter, prompt, params, None).run()

    _, warm = timed(device, plain)
    reference = warm.token_ids
    plain_runs = [timed(device, plain) for _ in range(args.repeats)]
    spec_runs = [timed(device, lambda i=i: speculative(i)) for i in range(args.repeats)]
    plain_s = statistics.median(t for t, _ in plain_runs)
    spec_s = statistics.median(t for t, _ in spec_runs)
    return {"tokens": reference, "plain_ms_per_token": 1000 * plain_s / args.new_tokens,
            "speculative_ms_per_token": 1000 * spec_s / args.new_tokens, "speedup": plain_s / spec_s,
            "acceptance": statistics.median(out.stats.acceptance_rate or 0.0 for _, out in spec_runs),
            "plain_stable": all(out.token_ids == reference for _, out in plain_runs),
            "speculative_equals_plain": all(out.token_ids == reference for _, out in spec_runs)}


def rank_main(rank: int, args, init_file: str, out_file: str) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.world)
    try:
        dtype = torch.bfloat16 if cuda else torch.float32
        model = llama(args.shape, VOCAB[args.shape], 0, dtype, decisive=True, device=device)
        prompt = torch.randint(3, model.config.vocab_size, (args.prompt_tokens,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        split = TensorParallelGraphDecoder(model, f"{args.shape}-tp{args.world}", dtype, set(),
                                           model.config.vocab_size, capacity=args.prompt_tokens + args.new_tokens + 16)
        result = {"split": measure(split, prompt, args, device)}
        del split
        dist.barrier()
        if rank == 0:
            whole = GraphDecoder(model, args.shape, dtype, set(), model.config.vocab_size,
                                 capacity=args.prompt_tokens + args.new_tokens + 16)
            result["one_device"] = measure(whole, prompt, args, device)
            result["split_equals_one_device"] = result["split"]["tokens"] == result["one_device"]["tokens"]
            for part in ("split", "one_device"):
                result[part].pop("tokens")
            result["config"] = {**vars(args), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
            Path(out_file).write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shape", choices=tuple(VOCAB), default="8b")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"--world {args.world} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    out_dir = Path(os.environ.get("OUT", "gpu-out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "tensor_parallel.json"
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(rank_main, args=(args, os.path.join(scratch, "init"), str(out_file)), nprocs=args.world, join=True)
    result = json.loads(out_file.read_text())
    split, whole = result["split"], result["one_device"]
    print(f"| | plain ms/token | speculative ms/token (alpha {args.alpha}, k {args.k}) | speedup | identical |")
    print("|---|---|---|---|---|")
    print(f"| TP={args.world} | {split['plain_ms_per_token']:.2f} | {split['speculative_ms_per_token']:.2f} | "
          f"{split['speedup']:.2f}x | {split['speculative_equals_plain'] and result['split_equals_one_device']} |")
    print(f"| one device | {whole['plain_ms_per_token']:.2f} | {whole['speculative_ms_per_token']:.2f} | "
          f"{whole['speedup']:.2f}x | {whole['speculative_equals_plain']} |")


if __name__ == "__main__":
    main()
