"""Which tokens a draft should be able to propose: the most frequent ones, ranked once per tokenizer.

A draft whose output head covers only the N most frequent tokens reads N/V of the head's
bytes per step (Gemma 3: 262,144 x 640, the costliest layer of the 270M model). Tokens
outside the set get draft probability zero, which the verify rule handles losslessly: the
target simply never accepts a draft there and supplies the token itself.

The ranking comes from text every Python installation carries (the language reference and
library docs in `pydoc_data`, and standard-library source), never from the benchmark
prompts; it is cached under the model cache, keyed by the tokenizer's vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

from ..loading.cache_dir import cache_root

log = logging.getLogger("specdec")

RANKING_FORMAT = "1"  # bump when the corpus changes
MAX_SOURCE_FILES = 400  # standard-library modules, enough code without minutes of tokenizing


def frequent_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Every id in [0, vocab_size), most frequent first (ids unseen in the corpus keep id order)."""
    path = cache_root() / "token-rankings" / f"{vocabulary_key(tokenizer)}-{RANKING_FORMAT}.json"
    counts: dict[int, int] | None = None
    if path.exists():
        try:
            counts = {int(t): int(n) for t, n in json.loads(path.read_text())["counts"].items()}
        except (ValueError, KeyError, OSError):
            counts = None
    if counts is None:
        started = time.perf_counter()
        counts = _count_tokens(tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".tmp{os.getpid()}")
        staged.write_text(json.dumps({"format": RANKING_FORMAT, "counts": counts}))
        staged.replace(path)
        log.info("ranked %d distinct tokens by frequency in %.1f s (cached in %s)",
                 len(counts), time.perf_counter() - started, path)
    frequency = torch.zeros(vocab_size, dtype=torch.long)
    seen = [t for t in counts if t < vocab_size]
    frequency[torch.tensor(seen, dtype=torch.long)] = torch.tensor([counts[t] for t in seen], dtype=torch.long)
    # Stable sort: equal counts (the unseen tail) stay in id order.
    return torch.sort(frequency, descending=True, stable=True).indices


def _count_tokens(tokenizer: Any) -> dict[int, int]:
    counts: Counter[int] = Counter()
    for text in _corpus():
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return dict(counts)


def _corpus() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics  # the language reference, as prose

        yield from topics.values()
    except ImportError:  # pragma: no cover - some distributions strip it
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:MAX_SOURCE_FILES]:
        yield path.read_text(errors="ignore")


def vocabulary_key(tokenizer: Any) -> str:
    """A digest of the tokenizer's id -> token table: equal keys mean token ids mean the same text.
    Computed once per tokenizer object (hashing a 262k-token vocabulary takes ~0.3 s)."""
    key = getattr(tokenizer, "_specdec_vocabulary_key", None)
    if key is None:
        digest = hashlib.sha256()
        for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            digest.update(f"{token_id}\t{token}\n".encode("utf-8", "surrogatepass"))
        key = digest.hexdigest()[:16]
        try:
            tokenizer._specdec_vocabulary_key = key
        except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes
            pass
    return key
