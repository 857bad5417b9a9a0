"""Synthetic acceptance, for benchmarks on random-weight models only.

Random weights give no meaningful acceptance, so this drafter proposes the target's own greedy
continuation (computed by a plain run first) with each token replaced at rate 1 - alpha,
while still running a real draft model's forward passes so their cost is paid. The draft
model's own tokens are discarded; its cache stays the right length, which is all its cost needs.
"""
from __future__ import annotations

import torch

from ..sampling_params import SamplingParams
from .base import Drafter, DraftProposal, ProposalSteps, SteppedDrafter


class SyntheticDrafter(SteppedDrafter):
    def __init__(self, cost_drafter: Drafter | None, reference: list[int], alpha: float, vocab_size: int,
                 seed: int = 0) -> None:
        self.cost_drafter = cost_drafter
        self.reference = torch.tensor(reference)
        self.alpha = alpha
        self.vocab_size = vocab_size
        self.rng = torch.Generator().manual_seed(seed)

    def proposal_steps(self, context: torch.Tensor, k: int, params: SamplingParams,
                       generator: torch.Generator | None) -> ProposalSteps:
        paid = None
        if self.cost_drafter is not None:
            paid = yield from self.cost_drafter.proposal_steps(context, k, params, generator)
        truth = self.reference[context.shape[0] : context.shape[0] + k]
        corrupt = torch.rand(truth.shape[0], generator=self.rng) >= self.alpha
        shifted = (truth + 1 + torch.randint(0, self.vocab_size - 1, truth.shape, generator=self.rng)) % self.vocab_size
        tokens = torch.where(corrupt, shifted, truth)
        return DraftProposal(tokens, None, paid.forward_passes if paid else 0, paid.positions if paid else 0)

    def release(self) -> None:
        if self.cost_drafter is not None:
            self.cost_drafter.release()

    def share_context(self, target, target_cache) -> None:
        if self.cost_drafter is not None:  # a feature head reads the target's features
            self.cost_drafter.share_context(target, target_cache)

    @property
    def reads_target_cache(self) -> bool:
        return self.cost_drafter is not None and self.cost_drafter.reads_target_cache

    def observe(self, num_accepted: int) -> None:
        if self.cost_drafter is not None:
            self.cost_drafter.observe(num_accepted)
