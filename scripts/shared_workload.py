"""A benchmark workload from the public prompts in ../shared/data, for `specdec bench --workload FILE`.

The first N prompts of each source (HumanEval completions as they are: code; GSM8K, MT-bench's first
turns and Alpaca as "Question: ...\\nAnswer:" for the base model: maths, chat, instruction).
Usage: python scripts/shared_workload.py [--per-source 5] [--data ../shared/data] > shared.jsonl
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def rows(data: Path, per_source: int) -> list[dict[str, str]]:
    def first(path: Path) -> list[dict]:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as lines:
            return [json.loads(line) for _, line in zip(range(per_source), lines)]

    def question(text: str) -> str:
        return f"Question: {text}\nAnswer:"

    out = [{"id": r["task_id"].replace("/", "-"), "category": "code", "prompt": r["prompt"]}
           for r in first(data / "humaneval.jsonl.gz")]
    out += [{"id": f"gsm8k-{i}", "category": "maths", "prompt": question(r["question"])}
            for i, r in enumerate(first(data / "gsm8k-test.jsonl"))]
    out += [{"id": f"mt-bench-{r['question_id']}", "category": "chat", "prompt": question(r["turns"][0])}
            for r in first(data / "mt-bench.jsonl")]
    out += [{"id": f"alpaca-{r['question_id']}", "category": "instruction", "prompt": question(r["turns"][0])}
            for r in first(data / "alpaca.jsonl")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    args = parser.parse_args()
    for row in rows(args.data, args.per_source):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
