"""`specdec bench`: the seed's table on the user's own workload."""
from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import SpecDecError

HF_PROMPT_LOOKUP_TOKENS = 10  # transformers' documented typical value
LLAMA_CPP_LOOKUP_TOKENS = 10  # LlamaPromptLookupDecoding's default


def add_bench_parser(sub) -> None:
    from ..model_args import add_model_args

    p = sub.add_parser("bench", help="measure speedup, acceptance and compute against plain decoding and peers")
    add_model_args(p, several_drafters=True)
    p.add_argument("--workload", default="all",
                   help="JSONL file, or built-in: grounded, code, open, all, and json (JSON extraction under a "
                        "schema per prompt; not in all) (comma-separated; default: all)")
    p.add_argument("--limit", type=int, help="at most this many prompts per workload")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-draft-tokens", default="adaptive",
                   help="K, 'adaptive', or a comma-separated sweep such as 2,4,8,adaptive")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peers", action="store_true",
                   help="skip the peers: transformers' generate() (torch), llama-cpp-python's own (llama.cpp)")
    p.add_argument("--serve", action="store_true",
                   help="serving mode: many requests at once through the batched loop, plain against speculative")
    p.add_argument("--concurrency", default="1,2,4,8,16,32",
                   help="serving mode, closed loop: requests in flight, comma-separated (default: 1,2,4,8,16,32)")
    p.add_argument("--request-rate", default="",
                   help="serving mode, open loop: Poisson arrivals per second, comma-separated (e.g. 0.5,1,2)")
    p.add_argument("--requests", type=int,
                   help="serving mode: requests per load point (default: 2 x concurrency, at least 8)")
    p.add_argument("--control", action="store_true",
                   help="serving mode: run plain decoding twice ('plain-again'), interleaved with the others: "
                        "its ratio to plain sizes this machine's run-to-run noise")
    p.add_argument("--soak", type=float, metavar="SECONDS",
                   help="soak mode: a real server under --streams clients streaming for SECONDS, some hanging up; "
                        "reports lost requests and leaked slots (exit 1 if any)")
    p.add_argument("--streams", type=int, default=32, help="soak mode: clients streaming at once (default: 32)")
    p.add_argument("--disconnect-rate", type=float, default=0.2,
                   help="soak mode: share of requests whose client hangs up mid-stream (default: 0.2)")
    p.add_argument("--out", help="output directory (default: bench-out/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from torch import nn

    from ..api import feature_head_for, load, resolve_backend
    from ..backends.graph_decoder import graph_decoder_for
    from ..draft_models.self_draft import self_draft_for
    from ..loading.loader import resolve_device
    from .report import PEER_COLUMNS, terminal_table, write_report
    from .runner import BASELINE, against_peers, run_benchmark, summarize
    from .runs import HFGenerateRun, LlamaCppPythonRun, SpecdecRun
    from .workloads import load_workload

    ks = _parse_ks(args.num_draft_tokens)
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise SpecDecError("--repeats and --max-new-tokens must be >= 1")
    prompts = load_workload(args.workload, args.limit)
    drafters = _parse_drafters(args.drafter, args.draft)
    backend = resolve_backend(args.backend, args.target, resolve_device(args.device),
                              "self" if any("self" in d for d in drafters) else None)
    engine = load(target=args.target, draft=args.draft, drafter=None if args.draft else "ngram",
                  device=args.device, dtype=args.dtype, backend=backend, cuda_graphs=args.cuda_graphs,
                  compact_target=args.compact_target)
    self_draft = None
    if any("self" in d for d in drafters):
        self_draft = self_draft_for(engine.target, engine.tokenizer, args.self_draft, args.draft_vocab or None)
        if args.cuda_graphs:
            self_draft = graph_decoder_for(self_draft)

    feature_head = feature_head_for(engine, args.target) if any("feature" in d for d in drafters) else None

    def variant_of(drafter: str):
        draft = self_draft if "self" in drafter else feature_head if "feature" in drafter else None
        return engine.with_drafter(drafter, draft)

    if args.soak is not None:
        return _bench_soak(args, variant_of(drafters[0]))
    if args.serve:
        return _bench_serving(args, engine, [(d, variant_of(d)) for d in drafters], prompts)
    runs = [SpecdecRun(BASELINE, engine.with_drafter("none"), 0, kind="baseline")]
    for drafter in drafters:
        variant = variant_of(drafter)
        for k in ks:
            suffix = "" if len(ks) == 1 else f" k={'adaptive' if k is None else k}"
            runs.append(SpecdecRun(f"specdec-{drafter}{suffix}", variant, k))
    if not args.no_peers and backend == "torch":  # the transformers peers need the torch model
        runs.append(HFGenerateRun("hf-plain", engine))
        if "ngram" in drafters:
            lookup = ks[0] if len(ks) == 1 and ks[0] else HF_PROMPT_LOOKUP_TOKENS
            runs.append(HFGenerateRun("hf-prompt-lookup", engine, prompt_lookup_tokens=lookup))
        if (args.draft and isinstance(getattr(engine.draft_model, "model", None), nn.Module)
                and not getattr(engine.draft_model, "reads_features", False)):
            # a distilled draft shares the target's embedding: it is no standalone assistant model
            runs.append(HFGenerateRun("hf-assisted", engine, assistant=True))
    if not args.no_peers and backend == "llama.cpp":  # the engine a CPU user would otherwise pick
        gguf, eos = engine.target.path, engine.target.eos_token_ids
        runs.append(LlamaCppPythonRun("llama-cpp-python-plain", gguf, eos))
        if "ngram" in drafters:
            runs.append(LlamaCppPythonRun("llama-cpp-python-lookup", gguf, eos, lookup_tokens=LLAMA_CPP_LOOKUP_TOKENS))

    out_dir = Path(args.out or f"bench-out/{time.strftime('%Y%m%d-%H%M%S')}")
    config = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(engine.target.device),
        "target": engine.target.name, "draft": engine.draft_model.name if engine.draft_model else None,
        "device": str(engine.target.device), "dtype": str(getattr(engine.target, "dtype", "")).removeprefix("torch."),
        "workload": args.workload, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "temperature": args.temperature, "num_draft_tokens": args.num_draft_tokens,
        "command": "specdec " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    results = run_benchmark(engine, runs, prompts, args.max_new_tokens, args.repeats, args.temperature, args.seed,
                            config, progress=not args.quiet)
    config.update(_measured_costs(engine, runs, prompts[0]))
    paths = write_report(results, out_dir)
    print(terminal_table(summarize(results)))
    if peers := against_peers(results):
        print("\nagainst each peer, prompt by prompt (time per token):\n" + terminal_table(peers, PEER_COLUMNS))
    print(f"\nreport: {paths['markdown']}\nresults: {paths['json']}", file=sys.stderr)
    mismatched = [m for m in results.measurements if m.identical_to_baseline is False and m.kind == "specdec"]
    if mismatched:
        print(f"warning: {len(mismatched)} speculative greedy outputs differed from plain decoding", file=sys.stderr)
    return 0


def _bench_soak(args: argparse.Namespace, engine) -> int:
    import json

    from .soak import soak

    if args.soak <= 0 or args.streams < 1 or not 0 <= args.disconnect_rate <= 1:
        raise SpecDecError("--soak must be > 0 seconds, --streams >= 1, --disconnect-rate in [0, 1]")
    engine.reserve_sequences(args.streams)
    result = soak(engine, args.soak, args.streams, args.disconnect_rate, args.max_new_tokens, args.seed)
    out_dir = Path(args.out or f"bench-out/soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": _machine(engine.target.device), "target": engine.target.name,
               "drafter": engine.drafter_name, "command": "specdec " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               **result.summary()}
    (out_dir / "soak.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(result.lines()))
    print(f"results: {out_dir / 'soak.json'}", file=sys.stderr)
    return 1 if result.lost or result.leaked_slots or result.running_after or result.queued_after else 0


def _measured_costs(engine, runs, prompt) -> dict:
    """The verify-cost curve and each speculative run's draft cost, for the ideal speedup (ideal.py).
    A hybrid drafter's cost per token depends on which part drafted it: its ideal is left out."""
    from .ideal import pass_costs
    from .runner import encode_prompt

    context = encode_prompt(engine, prompt)
    verify = pass_costs(engine.target, context)
    model_costs: dict[int, float] = {}
    draft_ms, draft_lengths = {}, {}
    for run in runs:
        if run.kind != "specdec":
            continue
        drafter, draft_model = run.engine.drafter_name, run.engine.draft_model
        if drafter == "ngram":
            draft_ms[run.name] = 0.0
        elif drafter in ("model", "self") and draft_model is not None:
            if id(draft_model) not in model_costs:
                model_costs[id(draft_model)] = pass_costs(draft_model, context, max_positions=1)[0]
            draft_ms[run.name] = round(model_costs[id(draft_model)] * 1000, 3)
        draft_lengths[run.name] = run.num_draft_tokens
    return {"verify_cost_ms": [round(t * 1000, 3) for t in verify], "draft_cost_ms": draft_ms,
            "draft_lengths": draft_lengths}


def _bench_serving(args: argparse.Namespace, engine, variants, prompts) -> int:
    import json
    import random

    from ..batching import BatchStepper
    from .runner import encode_prompt
    from .serving import serve, serving_table

    loads = [(c, None) for c in _parse_numbers(args.concurrency, int, "--concurrency")]
    rates = _parse_numbers(args.request_rate, float, "--request-rate") if args.request_rate else []
    loads += [(max(c for c, _ in loads), r) for r in rates]
    encoded = [encode_prompt(engine, p) for p in prompts]
    runs = [("plain", engine.with_drafter("none"))] + variants
    if args.control:
        runs.append(("plain-again", engine.with_drafter("none")))
    for _, variant in runs:  # as `specdec serve` does for its --max-concurrency
        variant.reserve_sequences(max(c for c, _ in loads))
    # One stepper per run for the whole bench, as a running server keeps one (its k planner
    # learns the batched verify's costs); a warm-up round at the largest load teaches it.
    steppers = {name: BatchStepper(variant.target) for name, variant in runs}
    warm = [encoded[i % len(encoded)] for i in range(max(c for c, _ in loads))]
    for name, variant in runs:
        serve(variant, warm, min(16, args.max_new_tokens), len(warm), stepper=steppers[name])
    order = random.Random(args.seed)
    rows = []
    for concurrency, rate in loads:
        count = args.requests or max(8, 2 * concurrency)
        batch = [encoded[i % len(encoded)] for i in range(count)]
        points: dict[str, list] = {name: [] for name, _ in runs}
        outputs: dict[str, list] = {}
        for repeat in range(args.repeats):
            # Runs interleaved, in a fresh order each repeat: drifts in machine speed hit all
            # alike, and no run always follows the same one.
            for name, variant in order.sample(runs, len(runs)):
                point, tokens = serve(variant, batch, args.max_new_tokens, concurrency, rate, args.temperature,
                                      args.seed, steppers[name])
                points[name].append(point)
                outputs.setdefault(name, tokens)
        plain, plain_full = _median(points["plain"], "tokens_per_s"), _median(points["plain"], "full_tokens_per_s")
        for name, _ in runs:
            # Throughputs: the medians of the repeats; the other columns: the repeat nearest to it.
            throughput, full = _median(points[name], "tokens_per_s"), _median(points[name], "full_tokens_per_s")
            nearest = min(points[name], key=lambda p: abs(p.tokens_per_s - throughput))
            # Each repeat's ratio against the plain run beside it: their spread is the noise.
            paired = [p.tokens_per_s / q.tokens_per_s for p, q in zip(points[name], points["plain"])]
            row = nearest.to_dict() | {"run": name, "tokens_per_s": throughput, "throughput_ratio": throughput / plain,
                                       "ratio_range": f"{min(paired):.2f}-{max(paired):.2f}"
                                       if name != "plain" and len(paired) > 1 else None,
                                       "paired_ratios": paired, "full_tokens_per_s": full,
                                       "full_ratio": full / plain_full if full and plain_full else None}
            if args.temperature == 0:
                same = [a == b for a, b in zip(outputs[name], outputs["plain"])]
                row["identical"] = sum(same) / len(same)
            rows.append(row)
            if not args.quiet:
                print(f"load {concurrency if rate is None else f'{rate:g} req/s'}: {name} "
                      f"{row['tokens_per_s']:.1f} tok/s ({row['throughput_ratio']:.2f}x)", file=sys.stderr)
    out_dir = Path(args.out or f"bench-out/serving-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(engine.target.device),
              "target": engine.target.name, "workload": args.workload, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "temperature": args.temperature,
              "command": "specdec " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    (out_dir / "serving.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    (out_dir / "serving.md").write_text(
        f"# Serving benchmark\n\n{config['machine']}, {config['date']}\n\n`{config['command']}`\n\n"
        f"Throughput is the median of {args.repeats} runs, interleaved; 'vs plain' is its ratio to plain "
        "decoding's at the same load, and 'range' the lowest and highest of the repeats' ratios to the plain run "
        "beside them. "
        + ("'plain-again' (--control) is plain decoding run a second time: its ratio is the machine's noise. "
           if args.control else "")
        + "'full' counts only the steps that ran with every slot busy (closed loop: without the start and "
        "the drain). 'rows/tok' is the positions the target verified per generated token (plain: 1.00).\n\n"
        + serving_table(rows, markdown=True) + "\n")
    print(serving_table(rows))
    print(f"\nreport: {out_dir / 'serving.md'}", file=sys.stderr)
    return 0


def _median(points: list, field: str) -> float | None:
    values = [getattr(p, field) for p in points if getattr(p, field) is not None]
    return statistics.median(values) if values else None


def _parse_numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecDecError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SpecDecError(f"{flag}: expected positive numbers, got {text!r}")
    return values


def _parse_drafters(text: str | None, draft: str | None) -> list[str]:
    from ..engine import DRAFTERS

    if not text:
        return ["ngram", "model"] if draft else ["ngram"]
    drafters = [d.strip() for d in text.split(",") if d.strip()]
    for d in drafters:
        if d == "none":
            raise SpecDecError("--drafter none is the baseline, which always runs; name drafters to compare")
        if d not in DRAFTERS:
            raise SpecDecError(f"unknown drafter {d!r}: choose from {', '.join(DRAFTERS[:-1])}")
        if d in ("model", "ngram+model") and not draft:
            raise SpecDecError(f"drafter {d!r} needs --draft")
    return drafters


def _parse_ks(text: str) -> list[int | None]:
    ks: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "adaptive":
            ks.append(None)
        elif part.isdigit() and 1 <= int(part) <= 64:
            ks.append(int(part))
        else:
            raise SpecDecError(f"--num-draft-tokens: expected K in 1..64, 'adaptive', or a comma list, got {part!r}")
    return ks


def _machine(device) -> str:
    import os

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
