"""The drafter interface: propose up to k tokens; observe how many the target accepted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..sampling_params import SamplingParams


@dataclass(frozen=True)
class DraftProposal:
    tokens: torch.Tensor  # [k'] int64, k' <= k (a drafter may propose fewer, even none)
    # [k', vocab] distribution each token was drawn from, shaped by the request's sampling
    # settings; None when the drafter is deterministic (model-free, or greedy): q = one-hot.
    probs: torch.Tensor | None
    forward_passes: int  # draft model forward passes spent on this proposal
    positions: int = 0  # token positions the draft model processed for it (its compute)


class Drafter(Protocol):
    """One drafter instance serves one sequence; model weights behind it are shared."""

    def propose(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> DraftProposal:
        """context: [n] every token so far (prompt + output). Propose up to k continuations."""

    def observe(self, num_accepted: int) -> None:
        """The target accepted the first `num_accepted` tokens of the last proposal."""


DrafterFactory = Callable[[], Drafter]


def empty_proposal(device: torch.device | str = "cpu") -> DraftProposal:
    return DraftProposal(torch.empty(0, dtype=torch.long, device=device), None, 0, 0)
