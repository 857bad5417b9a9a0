"""Prompt lookup when the context offers a match, a draft model otherwise.

Copy-heavy spans (quotes, code being edited) get the free n-gram proposal; open text gets
the model's. Each step's proposal comes from one drafter, and only that one is told the
outcome; the model drafter catches up on skipped tokens at its next proposal.
"""
from __future__ import annotations

import torch

from ..sampling_params import SamplingParams
from .base import Drafter, ProposalSteps, SteppedDrafter
from .ngram import NGramDrafter

MIN_LOOKUP_TOKENS = 2  # shorter lookups are usually coincidental single-token matches


class HybridDrafter(SteppedDrafter):
    def __init__(self, model_drafter: Drafter, lookup: NGramDrafter | None = None) -> None:
        self.lookup = lookup or NGramDrafter()
        self.model_drafter = model_drafter
        self._last: Drafter | None = None

    def proposal_steps(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> ProposalSteps:
        proposal = self.lookup.propose(context, k, params, generator)
        if proposal.tokens.shape[0] >= min(k, MIN_LOOKUP_TOKENS):
            self._last = self.lookup
            return proposal
        self._last = self.model_drafter
        return (yield from self.model_drafter.proposal_steps(context, k, params, generator))

    def share_context(self, target, target_cache) -> None:
        self.model_drafter.share_context(target, target_cache)

    @property
    def reads_target_cache(self) -> bool:
        return self.model_drafter.reads_target_cache

    def release(self) -> None:
        self.model_drafter.release()

    def observe(self, num_accepted: int) -> None:
        if self._last is not None:
            self._last.observe(num_accepted)
