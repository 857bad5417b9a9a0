"""Training text for a draft: read from a file, a directory or a built-in source; packed into sequences.

Documents are split into training and held-out sets before packing, so the evaluation
never sees text the draft was trained on. Each packed sequence starts with the target's
BOS token, the context the target itself is used with.
"""
from __future__ import annotations

import gzip
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecDecError
from ..jsonl import jsonl_rows

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".jsonl.gz", ".json")
BUILTIN = {
    "python-docs": "the Python language reference and library topics (pydoc_data), as prose",
    "python-source": "the standard library's Python source files",
}
MAX_DIRECTORY_FILES = 20_000


@dataclass
class Corpus:
    train: torch.Tensor  # [sequences, seq_len] token ids
    held_out_documents: list[list[int]]  # whole documents, tokenized, never trained on
    train_tokens: int


def read_documents(spec: str) -> list[str]:
    """spec: a .jsonl / .jsonl.gz / .txt file, a directory of text files, or builtin:NAME;
    several joined by commas. Every non-empty string field of a JSON row is a document
    (prompts, answers, conversation turns), so any instruction or chat dataset works as is."""
    documents: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        documents += list(_read_one(part))
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise SpecDecError(f"training data {spec!r} holds no text")
    return documents


def _read_one(spec: str) -> Iterator[str]:
    if spec.startswith("builtin:"):
        yield from _builtin(spec.removeprefix("builtin:"))
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise SpecDecError(f"training data directory {str(path)!r} has no text files ({', '.join(TEXT_SUFFIXES)})")
        for file in files[:MAX_DIRECTORY_FILES]:
            yield from _read_file(file)
    elif path.is_file():
        yield from _read_file(path)
    else:
        raise SpecDecError(f"training data {spec!r} is neither a file, a directory nor builtin:NAME "
                           f"({', '.join('builtin:' + n for n in BUILTIN)})")


def _read_file(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        raise SpecDecError(f"cannot read training data {str(path)!r}: {exc}") from None
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for _, row in jsonl_rows(text, str(path)):
            yield from _strings(row)
    else:
        yield text


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _builtin(name: str) -> Iterator[str]:
    if name == "python-docs":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise SpecDecError("builtin:python-docs needs pydoc_data, which this Python installation lacks") from None
        yield from topics.values()
    elif name == "python-source":
        yield from (p.read_text(errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))
    else:
        raise SpecDecError(f"unknown built-in training data {name!r}: choose one of "
                           + ", ".join(f"builtin:{n} ({d})" for n, d in BUILTIN.items()))


def build_corpus(tokenizer: Any, documents: list[str], seq_len: int, held_out_fraction: float = 0.05,
                 seed: int = 0, max_tokens: int | None = None) -> Corpus:
    """Tokenize, split by document, and pack the training documents into [n, seq_len] rows."""
    if seq_len < 8:
        raise SpecDecError(f"--seq-len must be at least 8 tokens, got {seq_len}")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * held_out_fraction)) if len(order) > 1 and held_out_fraction > 0 else 0
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    held_out = [encode(documents[i]) for i in order[:held]]
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i in order[held:]:
        stream += encode(documents[i])
        if eos is not None:
            stream.append(eos)
        if max_tokens and len(stream) >= max_tokens:
            break
    body = seq_len - (bos is not None)
    rows = len(stream) // body
    if rows == 0:
        raise SpecDecError(f"the training text has {len(stream)} tokens, shorter than one training sequence "
                           f"({body} tokens): give more text or a smaller --seq-len")
    packed = torch.tensor(stream[: rows * body], dtype=torch.long).view(rows, body)
    if bos is not None:
        packed = torch.cat([torch.full((rows, 1), bos, dtype=torch.long), packed], dim=1)
    return Corpus(packed, [d for d in held_out if d], rows * body)
