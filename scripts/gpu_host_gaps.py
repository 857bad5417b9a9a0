"""How long the GPU idles between speculative steps: from the host reading a verify's verdict
to its launch of the next step's first draft pass (the GPU has nothing queued meanwhile).
Random-weight 8B target, 1B draft, synthetic acceptance. Usage: PYTHONPATH=src python3 scripts/gpu_host_gaps.py"""
from __future__ import annotations

import statistics
import sys

import torch

sys.path.insert(0, "scripts")
from gpu_bench import llama, timed_generation  # noqa: E402

from specdec import trace  # noqa: E402
from specdec.drafters.model import ModelDrafter  # noqa: E402
from specdec.drafters.synthetic import SyntheticDrafter  # noqa: E402
from specdec.backends.graph_decoder import graph_decoder_for  # noqa: E402
from specdec.backends.hf import HFCausalLM  # noqa: E402


def main() -> None:
    vocab = 128256
    target = graph_decoder_for(HFCausalLM(llama("8b", vocab, 0, decisive=True), "8b", eos_token_ids=set()), 1024)
    draft = graph_decoder_for(HFCausalLM(llama("1b", vocab, 1, decisive=True), "1b", eos_token_ids=set()), 1024)
    torch.manual_seed(0)
    prompt = torch.randint(2, vocab, (512,)).tolist()
    _, plain = timed_generation(target, None, prompt, 256, 0)
    reference = prompt + plain.token_ids

    marks: dict[str, list[float]] = {"verdict": [], "committed": [], "emitted": [], "launch": []}

    def record(event: str, source, at: float) -> None:
        if event in ("verdict", "committed", "emitted"):
            marks[event].append(at)
        elif event == "forward" and source is draft and len(marks["launch"]) < len(marks["verdict"]):
            marks["launch"].append(at)  # the next step's first draft pass

    device_gaps(target, draft, reference, prompt, 0.8, 4)
    with trace.recording(record):
        host_gaps(target, draft, reference, prompt, vocab, marks)


def host_gaps(target, draft, reference, prompt, vocab, marks) -> None:
    for alpha, k in ((0.9, 6), (0.8, 4)):
        for key in marks:
            marks[key].clear()
        make = lambda: SyntheticDrafter(ModelDrafter(draft), reference, alpha, vocab, seed=k)  # noqa: E731
        timed_generation(target, make(), prompt, 16, k)
        for key in marks:
            marks[key].clear()
        elapsed, out = timed_generation(target, make(), prompt, 256, k)
        steps = len(marks["launch"])
        us = lambda a, b: 1e6 * statistics.median(y - x for x, y in zip(marks[a][:steps], marks[b][:steps]))  # noqa: E731
        print(f"alpha={alpha} k={k}: {steps} steps, {1000 * elapsed / len(marks['verdict']):.2f} ms a step; "
              f"idle GPU from verdict to next launch {us('verdict', 'launch'):.0f} us "
              f"(accept+commit {us('verdict', 'committed'):.0f}, emit {us('committed', 'emitted'):.0f}, "
              f"propose {us('emitted', 'launch'):.0f})", flush=True)


def device_gaps(target, draft, reference, prompt, alpha: float, k: int) -> None:
    """Idle stretches of the GPU within a speculative generation (after its prefills), from a
    profile of its kernels: how much, and between which kernels."""
    from torch.profiler import ProfilerActivity, profile

    make = lambda: SyntheticDrafter(ModelDrafter(draft), reference, alpha, 128256, seed=k)  # noqa: E731
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_generation(target, make(), prompt, 128, k)
    print(f"alpha={alpha} k={k}: " + idle_report(prof, skip=0.25))


def idle_report(prof, skip: float = 0.0) -> str:
    """Where the profiled GPU sat idle: the share of the kernels' span, and the kernel pairs
    with the most idle time between them. skip: the share of kernels left out at the start."""
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    kernels = kernels[int(len(kernels) * skip):]
    gaps = []
    for before, after in zip(kernels, kernels[1:]):
        gap = after.time_range.start - max(before.time_range.end, 0)
        if gap > 0:
            gaps.append((gap, before.name[:50], after.name[:50]))
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    idle = sum(g for g, *_ in gaps)
    lines = [f"{span / 1000:.1f} ms of kernels' span, GPU idle {idle / 1000:.2f} ms ({idle / span:.1%}) in "
             f"{len(gaps)} gaps; gaps over 20 us: {sum(g for g, *_ in gaps if g > 20) / 1000:.2f} ms"]
    by_pair: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in gaps:
        by_pair.setdefault((before, after), []).append(gap)
    worst = sorted(by_pair.items(), key=lambda item: -sum(item[1]))[:8]
    for (before, after), values in worst:
        lines.append(f"  {sum(values) / 1000:.2f} ms in {len(values)} gaps  {before}  ->  {after}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
