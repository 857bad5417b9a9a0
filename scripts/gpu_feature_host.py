"""Where a speculative step with a feature head loses time to the host, on the GPU: the 8B-shaped
target and a feature head of its shape (int8 with FEATURE_INT8=1), synthetic acceptance alpha and k.
Prints the wall time per step, the GPU's busy time per step (the kernels' sum, from the profiler)
and the host's functions by own time. Usage: PYTHONPATH=src python3 scripts/gpu_feature_host.py [alpha k]"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
from gpu_bench import FEATURE_HEAD_TOKENS, llama, timed_generation  # noqa: E402

from specdec.backends.graph_decoder import graph_decoder_for  # noqa: E402
from specdec.backends.hf import HFCausalLM  # noqa: E402
from specdec.draft_models.feature_head import FeatureHead, GraphFeatureDecoder, one_layer_config  # noqa: E402
from specdec.drafters.feature import FeatureDrafter  # noqa: E402
from specdec.drafters.synthetic import SyntheticDrafter  # noqa: E402


def main() -> None:
    alpha, k = (float(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0.9, 6)
    vocab = 128256
    target_hf = llama("8b", vocab, 0, decisive=True)
    target = graph_decoder_for(HFCausalLM(target_hf, "8b", eos_token_ids=set()), 1024)
    torch.manual_seed(0)
    prompt = torch.randint(2, vocab, (512,)).tolist()
    _, plain = timed_generation(target, None, prompt, 256, 0)
    reference = prompt + plain.token_ids
    torch.manual_seed(2)
    head = GraphFeatureDecoder(FeatureHead(one_layer_config(target_hf.config)), target,
                               torch.arange(FEATURE_HEAD_TOKENS), "feature-8b", int8=os.environ.get("FEATURE_INT8") == "1")
    make = lambda seed: SyntheticDrafter(FeatureDrafter(head), reference, alpha, vocab, seed=seed)  # noqa: E731
    timed_generation(target, make(0), prompt, 32, k)  # captures the graphs
    for seed in (1, 2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        _, out = timed_generation(target, make(seed), prompt, 256, k)
        wall = time.perf_counter() - started
        print(f"alpha {alpha} k {k}: {1000 * wall / out.stats.target_forward_passes:.3f} ms a step, "
              f"{out.stats.target_forward_passes} steps, {out.stats.generated_tokens} tokens", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, out = timed_generation(target, make(3), prompt, 256, k)
    steps = out.stats.target_forward_passes
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1000  # ms
    print(f"GPU busy {busy / steps:.3f} ms a step (kernels' sum)")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))
    profiler = cProfile.Profile()
    profiler.enable()
    _, out = timed_generation(target, make(4), prompt, 256, k)
    profiler.disable()
    steps = out.stats.target_forward_passes
    print(f"host profile over {steps} steps (cProfile slows the host):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
