"""Does the draft pay? Acceptance and speedup on held-out text, against plain decoding and n-gram."""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import CausalLM
from ..engine import Engine


@dataclass
class EvaluationRow:
    name: str
    acceptance_rate: float | None  # None for plain decoding
    mean_accepted_length: float
    seconds: float  # total generation time over the prompts
    speedup: float  # plain seconds / these seconds
    identical_to_plain: bool
    # Of the steps that drafted a j-th token, the share whose j-th token was accepted (j = 1, 2, ..).
    per_position_acceptance: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def held_out_prompts(documents: list[list[int]], count: int, prompt_tokens: int = 64) -> list[list[int]]:
    """The opening `prompt_tokens` of up to `count` held-out documents (those long enough); says
    so on stderr when none is."""
    prompts = [d[:prompt_tokens] for d in documents if len(d) >= prompt_tokens // 2][:count]
    if count > 0 and not prompts:
        print("no held-out document is long enough to evaluate on; skipped", file=sys.stderr)
    return prompts


def evaluate(target: CausalLM, tokenizer: Any, drafts: dict[str, tuple[str, CausalLM | None]],
             prompts: list[list[int]], max_new_tokens: int, repeats: int = 1) -> list[EvaluationRow]:
    """Greedy generation of every prompt with plain decoding and with each drafter.

    drafts: display name -> (drafter, draft model or None). Times are medians over `repeats`,
    summed over prompts; every output is checked against plain decoding's."""
    configs = {"plain": ("none", None), **drafts}
    bos = [tokenizer.bos_token_id] if tokenizer is not None and tokenizer.bos_token_id is not None else []
    inputs = [p if p[:1] == bos else bos + p for p in prompts]
    engines = {name: Engine(target, tokenizer, drafter, model) for name, (drafter, model) in configs.items()}
    for engine in engines.values():  # warm-up: first-call allocations stay out of the times
        engine.generate(inputs[0], max_new_tokens=4)
    reference: list[list[int]] = []
    totals = {name: [0.0, 0, 0, 0, 0] for name in configs}  # seconds, drafted, accepted, tokens, passes
    positions = {name: ([], []) for name in configs}  # drafted and accepted, per draft position
    identical = {name: True for name in configs}
    for i, prompt in enumerate(inputs):
        for name, engine in engines.items():
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                out = engine.generate(prompt, max_new_tokens=max_new_tokens)
                times.append(time.perf_counter() - started)
            if name == "plain":
                reference.append(out.token_ids)
            identical[name] &= out.token_ids == reference[i]
            row = totals[name]
            row[0] += statistics.median(times)
            row[1] += out.stats.drafted_tokens
            row[2] += out.stats.accepted_tokens
            row[3] += out.stats.generated_tokens
            row[4] += out.stats.target_forward_passes
            for count, into in zip((out.stats.per_position_drafted, out.stats.per_position_accepted), positions[name]):
                into.extend([0] * (len(count) - len(into)))
                for j, c in enumerate(count):
                    into[j] += c
    plain_seconds = totals["plain"][0]
    return [EvaluationRow(name, (accepted / drafted if drafted else 0.0) if name != "plain" else None,
                          tokens / passes if passes else 0.0, seconds,
                          plain_seconds / seconds if seconds else 0.0, identical[name],
                          [a / d for d, a in zip(*positions[name]) if d])
            for name, (seconds, drafted, accepted, tokens, passes) in totals.items()]


def format_table(rows: list[EvaluationRow]) -> str:
    lines = ["| drafter | acceptance | by draft position | mean accepted length | time (s) | speedup vs plain "
             "| identical to plain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acceptance = "-" if r.acceptance_rate is None else f"{r.acceptance_rate:.0%}"
        by_position = " ".join(f"{a:.0%}" for a in r.per_position_acceptance[:8]) or "-"
        lines.append(f"| {r.name} | {acceptance} | {by_position} | {r.mean_accepted_length:.2f} | {r.seconds:.2f} | "
                     f"{r.speedup:.2f}x | {'yes' if r.identical_to_plain else 'NO'} |")
    return "\n".join(lines)
