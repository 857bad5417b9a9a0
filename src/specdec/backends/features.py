"""The target's final hidden states, kept per sequence for a feature drafter (drafters/feature.py).

A feature draft (EAGLE-style, draft_models/feature_head.py) predicts the target's next hidden
state from its last one. The target computes those states in every pass anyway (the head's
input); a sequence that asks (`keep_features`) has its passes write them into a `FeatureLog`
on its cache, and its drafter reads them after the verdict. Only the positions the drafter has
not read yet are kept: after a step that is the verify pass's k+1 rows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class FeatureLog:
    """Features of positions [start, end) of one sequence. A pass that reads positions p..
    overwrites from p on: a rewound cache's rejected positions are replaced by the next pass's."""

    def __init__(self) -> None:
        self.start = 0
        self.rows: torch.Tensor | None = None  # [end - start, hidden]

    @property
    def end(self) -> int:
        return self.start + (0 if self.rows is None else self.rows.shape[0])

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Keep a copy of `rows` (a view of a backend's reused buffer is fine) as positions start.."""
        rows = rows.detach()
        if self.rows is None or not self.start <= start <= self.end:
            self.start, self.rows = start, rows.clone()
            return
        self.rows = torch.cat([self.rows[: start - self.start], rows])

    def read(self, start: int, end: int) -> torch.Tensor:
        """Features [end - start, hidden] of positions start..end-1."""
        if self.rows is None or start < self.start or end > self.end:
            raise RuntimeError(f"features of positions {start}..{end} are not kept (have {self.start}..{self.end})")
        return self.rows[start - self.start : end - self.start]

    def forget_before(self, position: int) -> None:
        """The reader will not ask for positions before `position` again."""
        if self.rows is not None and position > self.start:
            drop = min(position, self.end) - self.start
            self.rows, self.start = self.rows[drop:], self.start + drop


def record_features(cache: Any, start: int, rows: torch.Tensor) -> None:
    """Where a pass wrote positions start.. of `cache`: keep their features if the sequence asked."""
    log = getattr(cache, "feature_log", None)
    if log is not None:
        log.write(start, rows)


class ExposesFeatures(ABC):
    """A target whose final hidden states (the output head's input, after the final norm) a
    feature draft can read, with the input embedding and the head rows it reuses."""

    feature_size: int  # the hidden state's width

    def keep_features(self, cache: Any) -> None:
        """From now on this sequence's passes keep the features of every position they read."""
        cache.feature_log = FeatureLog()

    def features(self, cache: Any, start: int, end: int) -> torch.Tensor:
        """Features [end - start, feature_size] of positions start..end-1, read since keep_features."""
        return cache.feature_log.read(start, end)

    def take_features(self, cache: Any, start: int, end: int) -> torch.Tensor:
        """`features`, after which the positions before `end` are not kept (a drafter's reads go forward)."""
        rows = cache.feature_log.read(start, end)
        cache.feature_log.forget_before(end)
        return rows

    @abstractmethod
    def input_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n, feature_size] float32: the embeddings the first layer reads (with any input scale)."""

    @abstractmethod
    def head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n, feature_size] float32: the output head's rows of these tokens."""
