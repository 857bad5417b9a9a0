"""GPU serving benchmark (#8): many requests at once, plain against speculative, in one device call.

Random-weight Llama-3.1-8B target and Llama-3.2-1B draft shapes (bf16, the static-cache path),
synthetic acceptance alpha (drafters/synthetic.py: each request's own plain greedy continuation,
each token replaced at rate 1 - alpha, the 1B draft's passes paid for real). Closed loop at each
concurrency: requests run through batching.BatchStepper as the server runs them; throughput,
latency p50/p95, acceptance; and whether every speculative output equals its plain output.
--request-rate R,..: open loop too, Poisson arrivals at R requests/s (seeded, the same for plain
and speculative), at most the largest concurrency in flight: latency and TTFT at a given load.

Usage (device tool): PYTHONPATH=src python3 scripts/gpu_serving.py [--quick]; writes $OUT/gpu_serving.json
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import llama, sync_time  # noqa: E402
from gpu_host_gaps import idle_report  # noqa: E402
from specdec import Engine, SamplingParams  # noqa: E402
from specdec.batching import BatchStepper  # noqa: E402
from specdec.bench.serving import serve  # noqa: E402
from specdec.drafters.model import ModelDrafter  # noqa: E402
from specdec.drafters.synthetic import SyntheticDrafter  # noqa: E402
from specdec.generation import Generation  # noqa: E402
from specdec.backends.graph_decoder import graph_decoder_for  # noqa: E402
from specdec.backends.hf import HFCausalLM  # noqa: E402

OUT = Path(os.environ.get("OUT", "gpu-out"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--request-rate", default="", help="open loop: Poisson arrivals per second, comma-separated")
    parser.add_argument("--open-requests", type=int, default=96, help="requests per open-loop point")
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--per-slot", type=int, default=4,
                        help="requests per slot at each load (a closed loop's start and drain weigh less in longer runs)")
    parser.add_argument("--k", type=int, default=None, help="fix the speculative runs' draft length (default: the planner's)")
    parser.add_argument("--profile", action="store_true", help="print where the host's time goes in each measured run")
    parser.add_argument("--gaps", action="store_true", help="print where the GPU idles in each measured run")
    parser.add_argument("--host", action="store_true", help="print the host's time between a step's launches")
    parser.add_argument("--steps", action="store_true",
                        help="print the step times of steps with and without a joining request")
    parser.add_argument("--prompts-apart", action="store_true",
                        help="read each joining prompt in a pass of its own, as before prompts joined the verify pass")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    vocab, prompt_len, new_tokens = 128256, 256, (32 if args.quick else 128)
    layers = 4 if args.quick else None
    target = graph_decoder_for(HFCausalLM(llama("8b", vocab, 0, layers=layers, decisive=True), "8b",
                                          eos_token_ids=set()), 1024)
    draft = graph_decoder_for(HFCausalLM(llama("1b", vocab, 1, layers=layers, decisive=True), "1b",
                                         eos_token_ids=set()), 1024)
    loads = [int(x) for x in args.concurrency.split(",")]
    began = time.perf_counter()
    for model in (target, draft):  # as `specdec serve --max-concurrency` does: batched steps run as graphs
        model.reserve_sequences(max(loads))
    reserve_s = time.perf_counter() - began
    print(f"reserved {max(loads)} sequences (pools, batched graphs) in {reserve_s:.1f} s", flush=True)
    if args.profile:  # what each batched graph costs the device alone
        for name, model in (("8b", target), ("1b", draft)):
            for (size, width), step in sorted(model._batch_steps.items()):
                if size in (2, 8, 32) and width in (1, 2, 4, 8):
                    seconds = sync_time(lambda: [step.run() for _ in range(20)])[0] / 20
                    print(f"{name} batched graph {size} x {width}: {seconds * 1e3:.2f} ms", flush=True)
    if args.profile:  # a request's prompts: the target's prefill, the draft's first read
        for name, model, n in (("8b", target, prompt_len - 1), ("1b", draft, prompt_len)):
            cache, ids = model.new_cache(), torch.randint(2, vocab, (n,))

            def prompt():
                model.rewind(cache, 0)
                model.forward(ids, cache, num_logits=1)
            prompt()
            seconds = sync_time(lambda: [prompt() for _ in range(10)])[0] / 10
            print(f"{name} prompt of {n} tokens: {seconds * 1e3:.2f} ms", flush=True)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                prompt()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
            model.release(cache)
    torch.manual_seed(0)
    distinct = [torch.randint(2, vocab, (prompt_len,)).tolist() for _ in range(8)]
    references = []
    for p in distinct:  # each prompt's plain greedy continuation: what the synthetic draft plants
        out = Generation(target, None, p, SamplingParams(max_new_tokens=new_tokens, num_draft_tokens=0), None).run()
        references.append(p + out.token_ids)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "alpha": args.alpha,
              "prompts_in_verify": not args.prompts_apart,
              "new_tokens": new_tokens, "prompt_tokens": prompt_len,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reserve_s": reserve_s, "rows": []}
    fused = not args.prompts_apart
    steppers = {"plain": BatchStepper(target, prompts_in_verify=fused),
                "speculative": BatchStepper(target, prompts_in_verify=fused)}
    engine = Engine(target, drafter="none")
    rates = [float(r) for r in args.request_rate.split(",") if r.strip()]
    for c, rate in [(c, None) for c in loads] + [(max(loads), r) for r in rates]:
        n = max(8, args.per_slot * c) if rate is None else args.open_requests
        prompts = [distinct[i % 8] for i in range(n)]
        drafters = {"plain": lambda i: None,
                    "speculative": lambda i: SyntheticDrafter(ModelDrafter(draft), references[i % 8], args.alpha,
                                                              vocab, seed=i)}

        def run(name, batch, tokens, rate=None):
            def start(i, ids, params):
                if name != "plain" and args.k is not None:
                    params = replace(params, num_draft_tokens=args.k)
                return Generation(target, drafters[name](i), ids, params, None)
            return serve(engine, batch, tokens, c, rate, stepper=steppers[name], start=start)

        def measured(name):
            if rate is not None:
                return run(name, prompts, new_tokens, rate)
            if args.steps:
                with StepTimes(steppers[name]) as times:
                    result = run(name, prompts, new_tokens)
                print(f"--- c={c} {name}: {result[0].tokens_per_s:.0f} tok/s; " + times.report(), flush=True)
                return result
            if args.host:
                with HostTimeline(target) as timeline:
                    result = run(name, prompts, new_tokens)
                print(f"--- c={c} {name}: {result[0].tokens_per_s:.0f} tok/s; host, medians per step: "
                      + timeline.report(), flush=True)
                return result
            if args.gaps:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    result = run(name, prompts, new_tokens)
                print(f"--- c={c} {name}: {result[0].tokens_per_s:.0f} tok/s under the profiler; "
                      + idle_report(prof), flush=True)
                return result
            if not args.profile:
                return run(name, prompts, new_tokens)
            profile = cProfile.Profile()
            result = profile.runcall(run, name, prompts, new_tokens)
            print(f"--- c={c} {name}: host time by function")
            pstats.Stats(profile).sort_stats("tottime").print_stats(14)
            pstats.Stats(profile).sort_stats("cumtime").print_stats(30)
            return result

        for name in drafters:  # warm-up at this load: the planner learns this batch's verify costs
            run(name, prompts[: max(c, 2)], 16)
        results = {name: measured(name) for name in drafters}
        plain, spec = results["plain"], results["speculative"]
        row = {"concurrency": c, "rate": rate, "requests": n, "plain": plain[0].to_dict(), "speculative": spec[0].to_dict(),
               "ratio": spec[0].tokens_per_s / plain[0].tokens_per_s,
               "full_ratio": spec[0].full_tokens_per_s / plain[0].full_tokens_per_s
               if spec[0].full_tokens_per_s and plain[0].full_tokens_per_s else None, "identical": spec[1] == plain[1]}
        report["rows"].append(row)
        if rate is not None:
            print(f"open loop, {rate:g} req/s (at most {c} in flight): latency p50/p95 plain "
                  f"{plain[0].latency_p50_s:.2f}/{plain[0].latency_p95_s:.2f} s, speculative "
                  f"{spec[0].latency_p50_s:.2f}/{spec[0].latency_p95_s:.2f} s; TTFT p50/p95 plain "
                  f"{1e3 * plain[0].ttft_p50_s:.0f}/{1e3 * plain[0].ttft_p95_s:.0f} ms, speculative "
                  f"{1e3 * spec[0].ttft_p50_s:.0f}/{1e3 * spec[0].ttft_p95_s:.0f} ms; identical {row['identical']}",
                  flush=True)
            (OUT / "gpu_serving.json").write_text(json.dumps(report, indent=2))
            continue
        print(f"c={c}: plain {plain[0].tokens_per_s:.0f} tok/s, speculative {spec[0].tokens_per_s:.0f} tok/s "
              f"({row['ratio']:.2f}x; every slot busy: {plain[0].full_tokens_per_s:.0f} and "
              f"{spec[0].full_tokens_per_s:.0f} tok/s, {row['full_ratio']:.2f}x; acceptance {spec[0].acceptance_rate or 0:.0%}, "
              f"k/step {spec[0].mean_draft_tokens:.1f}, identical {row['identical']})", flush=True)
        (OUT / "gpu_serving.json").write_text(json.dumps(report, indent=2))


class StepTimes:
    """Each batched step's wall time, by how many of its requests read their prompt in it."""

    def __init__(self, stepper) -> None:
        self.stepper, self.steps = stepper, []  # (joining, sequences, seconds)

    def __enter__(self) -> "StepTimes":
        step = self._step = self.stepper.step

        def timed(generations):
            joining = sum(not g.prefilled for g in generations)
            began = time.perf_counter()
            out = step(generations)
            self.steps.append((joining, len(generations), time.perf_counter() - began))
            return out
        self.stepper.step = timed
        return self

    def __exit__(self, *exc) -> None:
        self.stepper.step = self._step

    def report(self) -> str:
        import statistics
        parts = []
        for label, keep in (("no join", lambda j: j == 0), ("1 join", lambda j: j == 1), ("2+ joins", lambda j: j > 1)):
            times = [s for j, _, s in self.steps if keep(j)]
            if times:
                parts.append(f"{label}: {len(times)} steps, median {1e3 * statistics.median(times):.2f} ms, "
                             f"{sum(times):.3f} s in all")
        return "; ".join(parts)


class HostTimeline:
    """When the host read each step's verdicts, and when it had launched each batched pass:
    the GPU has nothing queued from a verdict's read until the next pass is launched."""

    def __init__(self, target) -> None:
        self.target = target
        self.marks: list[tuple[str, float]] = []  # ("verdict" | "draft" | "verify", host time)

    def __enter__(self) -> "HostTimeline":
        from specdec import trace

        def record(event: str, source, at: float) -> None:
            if event == "verdict":
                self.marks.append(("verdict", at))
            elif event == "batched_step":
                self.marks.append(("verify" if source is self.target else "draft", at))

        self._recording = trace.recording(record)
        self._recording.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._recording.__exit__(*exc)

    def report(self) -> str:
        import statistics
        first_launch, rounds, verify_after, steps = [], [], [], []
        verdict = last = None
        for kind, t in self.marks:
            if kind == "verdict":
                if verdict is not None:
                    steps.append(t - verdict)
                verdict, last = t, None
            elif verdict is not None:
                if last is None:
                    first_launch.append(t - verdict)
                elif kind == "draft":
                    rounds.append(t - last)
                else:
                    verify_after.append(t - last)
                last = t
        ms = lambda xs: f"{1e3 * statistics.median(xs):.2f} ms" if xs else "-"  # noqa: E731
        usual = 1.5 * statistics.median(steps) if steps else 0.0
        long = [x for x in steps if x > usual]  # steps with a new request's prompt in them
        return (f"step {ms(steps)}; verdict -> first launch {ms(first_launch)}; between draft launches "
                f"{ms(rounds)}; last draft -> verify launch {ms(verify_after)}; {len(steps)} steps: "
                f"{sum(steps) - sum(long):.3f} s in usual ones, {sum(long):.3f} s in {len(long)} longer ones")


if __name__ == "__main__":
    main()
