"""Prompt lookup: propose what followed the latest earlier occurrence of the current n-gram.

Model-free, so it costs microseconds and has a one-hot draft distribution. It shines where
the output copies from the input (summaries, extraction, edits of given code).
"""
from __future__ import annotations

import torch

from ..sampling_params import SamplingParams
from .base import Drafter, DraftProposal, empty_proposal


class NGramDrafter(Drafter):
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> DraftProposal:
        # context: [n]. Longer n-grams first: a longer match predicts its continuation better.
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if context.shape[0] <= n:
                continue
            pattern = context[-n:]
            windows = context[:-1].unfold(0, n, 1)  # [n_ctx - n, n], each with a continuation
            hits = (windows == pattern).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n  # the most recent match tracks the local context best
                return DraftProposal(context[start : start + k].clone(), None, 0)
        return empty_proposal(context.device)

    def observe(self, num_accepted: int) -> None:
        pass  # stateless: the context it searches already holds the accepted tokens
