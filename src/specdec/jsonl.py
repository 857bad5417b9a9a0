"""JSON Lines, read the same way everywhere: blank lines skipped, a bad line named by number."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .errors import SpecDecError


def jsonl_rows(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of `text`, read from `source`."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecDecError(f"{source}, line {number}: not JSON ({exc.msg})") from None
