"""What a feature head's confidence says, and what choosing drafts by it could gain, on CPU.

For every position of the target's greedy answer to each built-in prompt, it records the shipped
head's 8-token rollout (with the head's probability of each pick) and prompt lookup's proposal,
and how many of each the target's answer bears out. From those it prints:
  - the head's calibration: acceptance by its probability of the token, in tenths;
  - lookup's first token, by whether the head agrees with it (picks it, gives it >= 0.2, is
    unsure itself: top < 0.2, or disputes it);
  - decode speedups over plain steps that rules choosing source and length would get, under the
    verify and head-step costs timed in the same run (prefill not counted), and the oracle's
    (the best choice with hindsight each step): what draft selection could gain at most.
Greedy only; the target's answer is fixed, so every rule is scored on the same tokens.
Usage: python scripts/draft_signals.py [--max-new-tokens 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import specdec
from specdec.bench.runner import encode_prompt
from specdec.bench.workloads import load_workload
from specdec.drafters.feature import FeatureDrafter
from specdec.drafters.ngram import NGramDrafter
from specdec.sampling_params import SamplingParams

K = 8  # rollout length recorded per position


def matched(proposal: list[int], truth: list[int]) -> int:
    n = 0
    while n < min(len(proposal), len(truth)) and proposal[n] == truth[n]:
        n += 1
    return n


def rollout(drafter: FeatureDrafter, context: torch.Tensor,
            greedy: SamplingParams) -> tuple[list[int], list[float], torch.Tensor, float]:
    """The head's K picks, its probability of each, its first distribution over its columns, and
    seconds per feed."""
    steps = drafter.proposal_steps(context, K, greedy, None)
    feed, chances, first, started = next(steps), [], None, time.perf_counter()
    try:
        while True:
            logits = feed.model.forward(feed.token_ids, feed.cache, num_logits=1)
            probs = torch.softmax(logits[0].float(), -1)
            first = probs if first is None else first
            chances.append(float(probs.max()))
            feed = steps.send(logits)
    except StopIteration as done:
        proposal = done.value
    seconds = (time.perf_counter() - started) / proposal.forward_passes
    drafter.observe(0)
    return proposal.tokens.tolist(), chances, first, seconds


def collect(max_new_tokens: int) -> tuple[list[dict], dict]:
    engine = specdec.load(drafter="feature")
    target, greedy = engine.target, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    lookup, prompts, feeds = NGramDrafter(), [], []
    for prompt in load_workload("all"):
        ids = encode_prompt(engine, prompt)
        truth = engine.start(ids, greedy).run().token_ids
        sequence = torch.tensor(ids + truth)
        cache = target.new_cache()
        drafter = FeatureDrafter(engine.draft_model)
        drafter.share_context(target, cache)
        target.forward(sequence, cache, 1)  # every position's features, as verify passes leave them
        rows = []
        for i in range(len(truth)):
            context = sequence[: len(ids) + i]
            picks, chances, first, seconds = rollout(drafter, context, greedy)
            feeds.append(seconds)
            copied = lookup.propose(context, K, greedy, None).tokens.tolist()
            columns = engine.draft_model.column_token_ids(drafter.cache)
            where = (columns == copied[0]).nonzero() if copied else torch.empty(0)
            rows.append({"head": picks, "chances": chances, "head_matched": matched(picks, truth[i:]),
                         "lookup": copied, "lookup_matched": matched(copied, truth[i:]),
                         "lookup_first_chance": float(first[where[0, 0]]) if where.numel() else 0.0,
                         "head_top_chance": float(first.max())})
        target.release(cache)
        drafter.release()
        prompts.append({"id": prompt.id, "category": prompt.category, "rows": rows})
    verify = {}
    sequence = torch.tensor(encode_prompt(engine, load_workload("all")[0]))
    for positions in range(1, K + 2):
        times = []
        for _ in range(5):
            cache = target.new_cache()
            target.forward(sequence[:-positions], cache, 1)
            started = time.perf_counter()
            target.forward(sequence[-positions:], cache, positions)
            times.append(time.perf_counter() - started)
            target.release(cache)
        verify[positions] = statistics.median(times) * 1000
    return prompts, {"verify_ms": verify, "head_feed_ms": statistics.median(feeds) * 1000}


def lookup_signal(row: dict) -> str:
    if row["lookup"][0] == row["head"][0]:
        return "head agrees"
    if row["lookup_first_chance"] >= 0.2:
        return "head gives it >= 0.2"
    return "head unsure (top < 0.2)" if row["head_top_chance"] < 0.2 else "head disputes it"


def speedup(rows: list[dict], choose, costs: dict, consults_head: bool = False) -> float:
    """Decode speedup over plain steps of a rule choose(row) -> (source, k); consults_head: the
    rule reads the head's first pick every step, so a lookup step pays a head feed too."""
    verify, feed = costs["verify_ms"], costs["head_feed_ms"]
    i, spent = 0, 0.0
    while i < len(rows):
        source, k = choose(rows[i])
        k = min(k, len(rows[i][source]) if source else 0)
        accepted = min(rows[i][f"{source}_matched"], k) if source else 0
        spent += verify[k + 1] + (feed * max(k, 1) if source == "head" else feed if consults_head else 0.0)
        i += accepted + 1
    return len(rows) * verify[1] / spent


def head_step_ms(costs: dict, k: int) -> float:
    """A step that drafts k tokens with the head: its k feeds and the verify of k + 1 positions."""
    return costs["verify_ms"][k + 1] + costs["head_feed_ms"] * k


def best_prefix(acceptances: list[float], costs: dict) -> int:
    tokens, reach, best, best_k = 1.0, 1.0, 1.0 / costs["verify_ms"][1], 0
    for k, a in enumerate(acceptances, 1):
        reach *= a
        tokens += reach
        if (rate := tokens / head_step_ms(costs, k)) > best:
            best, best_k = rate, k
    return best_k


def report(prompts: list[dict], costs: dict) -> None:
    rows = [row for prompt in prompts for row in prompt["rows"]]
    calibration = {}
    for row in rows:
        for j, chance in enumerate(row["chances"][: row["head_matched"] + 1]):
            tenth = min(int(chance * 10), 9)
            hit, seen = calibration.get(tenth, (0, 0))
            calibration[tenth] = (hit + (j < row["head_matched"]), seen + 1)
    print("head's probability of its pick -> share accepted (checked tokens)")
    for tenth, (hit, seen) in sorted(calibration.items()):
        print(f"  {tenth / 10:.1f}-{(tenth + 1) / 10:.1f}: {hit / seen:.2f} ({seen})")
    signals = {}
    for row in rows:
        if len(row["lookup"]) >= 2:
            hit, seen = signals.get(lookup_signal(row), (0, 0))
            signals[lookup_signal(row)] = (hit + (row["lookup_matched"] > 0), seen + 1)
    print("lookup's first token accepted, by the head's view of it")
    for name, (hit, seen) in sorted(signals.items()):
        print(f"  {name}: {hit / seen:.2f} ({seen})")
    rates = {tenth: hit / seen for tenth, (hit, seen) in calibration.items()}
    feed = costs["head_feed_ms"]

    def head_by_confidence(row):
        # a tenth no token fell in (short runs) reads as its midpoint
        chances = [rates.get(min(int(c * 10), 9), min(int(c * 10), 9) / 10 + 0.05) for c in row["chances"]]
        return "head", best_prefix(chances, costs)

    def lookup_or_head(row):  # the shipped hybrid's choice, at a fixed k of 4
        return ("lookup", 4) if len(row["lookup"]) >= 2 else ("head", 2)

    def vetted(row):
        if len(row["lookup"]) >= 2 and lookup_signal(row) != "head disputes it":
            return "lookup", 4
        return head_by_confidence(row)

    def oracle(row):
        options = [("", 0, 1, costs["verify_ms"][1])]
        for k in range(1, K + 1):
            if len(row["lookup"]) >= k:
                options.append(("lookup", k, min(row["lookup_matched"], k) + 1, costs["verify_ms"][k + 1]))
            options.append(("head", k, min(row["head_matched"], k) + 1, head_step_ms(costs, k)))
        best = max(options, key=lambda o: o[2] / o[3])
        return best[0], best[1]

    rules = {"lookup, k 4": (lambda row: ("lookup", 4) if len(row["lookup"]) >= 2 else ("", 0), False),
             **{f"head, k {k}": (lambda row, k=k: ("head", k), False) for k in (1, 2, 3)},
             "head, k by its calibrated confidence": (head_by_confidence, False),
             "lookup where it matches, else head k 2": (lookup_or_head, False),
             "lookup unless the head disputes it, else head by confidence": (vetted, True),
             "oracle (best choice with hindsight)": (oracle, False)}
    print(f"costs: verify {', '.join(f'{n}: {ms:.1f}' for n, ms in costs['verify_ms'].items())} ms; "
          f"a head feed {feed:.2f} ms")
    print("rule -> decode speedup over plain steps: median over prompts (least)")
    for name, (rule, consults_head) in rules.items():
        speedups = [speedup(prompt["rows"], rule, costs, consults_head) for prompt in prompts]
        print(f"  {name}: {statistics.median(speedups):.2f}x ({min(speedups):.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", help="write the collected rows and costs here")
    args = parser.parse_args()
    prompts, costs = collect(args.max_new_tokens)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"prompts": prompts, "costs": costs}, out)
    report(prompts, costs)


if __name__ == "__main__":
    main()
