"""Where a speculative step with a feature head loses time, on the GPU: the 8B-shaped target and a
feature head of its shape (int8 with FEATURE_INT8=1), synthetic acceptance alpha and k; the head's
greedy steps one forward each (`rollout off`) against its captured rollout (`on`), alternated.
Prints per mode the wall time per step, the GPU's idle stretches (the profiler's kernels) and the
host's time from a verdict to the next head launch; then the host's functions by own time.
Usage: PYTHONPATH=src python3 scripts/gpu_feature_host.py [alpha k]"""
from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
from gpu_bench import FEATURE_HEAD_TOKENS, llama, timed_generation  # noqa: E402
from gpu_host_gaps import idle_report  # noqa: E402

from specdec import trace  # noqa: E402
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

    def make(seed: int, rollout: bool) -> SyntheticDrafter:
        return SyntheticDrafter(FeatureDrafter(head, rollout=rollout), reference, alpha, vocab, seed=seed)

    modes = {"rollout off": False, "rollout on": True}
    for rollout in modes.values():
        timed_generation(target, make(0, rollout), prompt, 32, k)  # captures the graphs
    per_step: dict[str, list[float]] = {mode: [] for mode in modes}
    for seed in range(1, 6):  # the same draws for both modes, alternated
        for mode, rollout in modes.items():
            torch.cuda.synchronize()
            started = time.perf_counter()
            _, out = timed_generation(target, make(seed, rollout), prompt, 256, k)
            steps = out.stats.target_forward_passes
            per_step[mode].append(1000 * (time.perf_counter() - started) / steps)
    for mode, rollout in modes.items():
        print(f"alpha {alpha} k {k}, {mode}: {statistics.median(per_step[mode]):.3f} ms a step (median of "
              f"{len(per_step[mode])}: {', '.join(f'{t:.3f}' for t in per_step[mode])})", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            timed_generation(target, make(1, rollout), prompt, 256, k)
        print("  " + idle_report(prof, skip=0.25).replace("\n", "\n  "), flush=True)
        print(f"  host: {host_marks(target, head, make(1, rollout), prompt, k)}")
    profiler = cProfile.Profile()
    profiler.enable()
    _, out = timed_generation(target, make(4, True), prompt, 256, k)
    profiler.disable()
    print(f"host profile, rollout on, over {out.stats.target_forward_passes} steps (cProfile slows the host):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def host_marks(target, head, drafter, prompt, k) -> str:
    """The host's time from a verdict to the next head launch (the GPU idles), and from that
    launch to the verify's (the host issuing the draft steps; nothing in it waits)."""
    marks: dict[str, list[float]] = {"verdict": [], "head": [], "verify": []}

    def record(event: str, source, at: float) -> None:
        if event == "verdict":
            marks["verdict"].append(at)
        elif event == "forward" and source is head and len(marks["head"]) < len(marks["verdict"]):
            marks["head"].append(at)  # the next step's catch-up feed
        elif event == "forward" and source is target and len(marks["verify"]) < len(marks["head"]):
            marks["verify"].append(at)

    with trace.recording(record):
        timed_generation(target, drafter, prompt, 256, k)
    idle = [1e6 * (b - a) for a, b in zip(marks["verdict"], marks["head"])]
    drafting = [1e6 * (b - a) for a, b in zip(marks["head"], marks["verify"])]
    return (f"median {statistics.median(idle):.0f} us from a verdict to the next head launch, "
            f"{statistics.median(drafting):.0f} us issuing the draft steps, over {len(idle)} steps")


if __name__ == "__main__":
    main()
