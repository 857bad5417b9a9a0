"""Turn accepted token ids into text deltas, holding back what a stop string or an unfinished
UTF-8 sequence could still change.

Each push decodes only a window: the tokens of the previous push and the new ones, and keeps
the part past the previous push's own text. Decoding the whole output every step would cost
O(n) per step (O(n²) per generation, seconds at a few thousand tokens). The window starts one
push back because decoders treat a sequence's first token specially (SentencePiece drops its
leading space), so both decodes share that first token and their difference is exact."""
from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any | None, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # decoded text of every pushed token, up to a stop string if one was hit
        self._emitted = 0
        self._window_start = 0  # token index the next decode starts at
        self._settled = 0  # tokens whose text is final in self.text
        self._settled_chars = 0  # length of that text
        # Tokenizers that clean up spaces around punctuation can change text across a window
        # boundary: decode those whole.
        self._incremental = tokenizer is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)

    def push(self, token_ids: list[int]) -> tuple[str, int | None]:
        """Add tokens; return (text delta safe to show, index in `token_ids` of the token that
        completed a stop string, or None)."""
        if self.tokenizer is None:
            self.token_ids.extend(token_ids)
            return "", None
        base = len(self.token_ids)
        self.token_ids.extend(token_ids)
        self.text = self._decoded_text()
        cut = self._find_stop(self.text)
        if cut is not None:
            self.text = self.text[:cut]
            return self._flush(), self._stop_token_index(base, len(token_ids))
        safe = len(self.text) - self._holdback
        if self.text.endswith("\ufffd"):  # a multi-byte character split across tokens
            safe = min(safe, len(self.text.rstrip("\ufffd")))
        delta = self.text[self._emitted : max(safe, self._emitted)]
        self._emitted += len(delta)
        return delta, None

    def finish(self) -> str:
        """Everything not yet emitted (call once the generation is over)."""
        return self._flush()

    def _flush(self) -> str:
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta

    def _decoded_text(self) -> str:
        if not self._incremental:
            return self._decode(self.token_ids)
        ids = self.token_ids
        before = self._decode(ids[self._window_start : self._settled])
        after = self._decode(ids[self._window_start :])
        if not after.startswith(before) or before.endswith("\ufffd"):
            return self._decode(ids)  # a decoder that rewrites earlier text: rare, stay exact
        text = self.text[: self._settled_chars] + after[len(before) :]
        if not text.endswith("\ufffd"):  # settle only whole characters
            self._window_start, self._settled, self._settled_chars = self._settled, len(ids), len(text)
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _find_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        # Only text after what was already emitted (less the hold-back) can hold a new match.
        start = max(0, self._emitted - self._holdback)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i != -1]
        return min(hits) if hits else None

    def _stop_token_index(self, base: int, count: int) -> int:
        # Rare path (once per generation): find the first new token whose text completes a stop.
        for j in range(count):
            if self._find_stop(self._decode(self.token_ids[: base + j + 1])) is not None:
                del self.token_ids[base + j + 1 :]
                return j
        return count - 1
