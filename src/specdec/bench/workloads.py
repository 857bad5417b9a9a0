"""Benchmark workloads: built-in (written by the project) or a user's JSONL file.

A row is {"prompt": str, "category": str, "id": str?} or {"messages": [...], "category": ...}, with
an optional "response_format" (OpenAI's, or response_format.py's extensions) that its output follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, SpecDecError
from ..response_format import ResponseFormat
from ..jsonl import jsonl_rows

BUILTIN = ("grounded", "code", "open")
# Built in but not in 'all': JSON extraction under a schema per prompt (structured outputs).
CONSTRAINED = ("json",)


@dataclass(frozen=True)
class WorkloadPrompt:
    id: str
    category: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


def load_workload(spec: str, limit: int | None = None) -> list[WorkloadPrompt]:
    """spec: a JSONL path, a built-in name, 'all', or names joined by commas."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise SpecDecError("empty workload name")
    prompts: list[WorkloadPrompt] = []
    for name in names:
        if name == "all":
            prompts += [p for n in BUILTIN for p in _limit(_builtin(n), limit)]
        elif name in BUILTIN + CONSTRAINED:
            prompts += _limit(_builtin(name), limit)
        else:
            prompts += _limit(_read(Path(name).expanduser()), limit)
    return prompts


def _limit(rows: list[WorkloadPrompt], limit: int | None) -> list[WorkloadPrompt]:
    return rows[:limit] if limit else rows


def _builtin(name: str) -> list[WorkloadPrompt]:
    text = resources.files("specdec.bench").joinpath("workloads", f"{name}.jsonl").read_text(encoding="utf-8")
    return _parse(text, f"built-in workload {name!r}")


def _read(path: Path) -> list[WorkloadPrompt]:
    if not path.is_file():
        raise SpecDecError(f"workload {str(path)!r} is neither a file nor a built-in name "
                           f"({', '.join(BUILTIN + CONSTRAINED)}, all)")
    return _parse(path.read_text(encoding="utf-8"), str(path))


def _parse(text: str, source: str) -> list[WorkloadPrompt]:
    rows = []
    for number, row in jsonl_rows(text, source):
        if not isinstance(row, dict):
            raise SpecDecError(f"{source}, line {number}: needs a JSON object")
        prompt, messages = row.get("prompt"), row.get("messages")
        if not (isinstance(prompt, str) and prompt) and not (isinstance(messages, list) and messages):
            raise SpecDecError(f"{source}, line {number}: needs a non-empty 'prompt' string or 'messages' list")
        response_format = row.get("response_format")
        try:
            ResponseFormat.parse(response_format)
        except InvalidRequestError as exc:
            raise SpecDecError(f"{source}, line {number}: {exc}") from None
        rows.append(WorkloadPrompt(str(row.get("id", f"{Path(source).stem}-{number}")),
                                   str(row.get("category", "default")), prompt if isinstance(prompt, str) else None,
                                   messages if isinstance(messages, list) else None, response_format))
    if not rows:
        raise SpecDecError(f"{source} has no prompts")
    return rows
