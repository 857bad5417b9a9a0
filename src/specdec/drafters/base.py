"""The drafter interface: propose up to k tokens; observe how many the target accepted."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Generator

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


class Drafter(ABC):
    """One drafter instance serves one sequence; model weights behind it are shared.

    `propose` and `observe` are what every drafter does; the rest have defaults for drafters
    that need nothing more (model-free ones)."""

    @abstractmethod
    def propose(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> DraftProposal:
        """context: [n] every token so far (prompt + output). Propose up to k continuations."""

    @abstractmethod
    def observe(self, num_accepted: int) -> None:
        """The target accepted the first `num_accepted` tokens of the last proposal."""

    def proposal_steps(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> ProposalSteps:
        """The proposal as steps, yielding each draft-model pass it waits for (a batch feeds many
        sequences' at once). Default: no model pass, the proposal at once."""
        return self.propose(context, k, params, generator)
        yield  # a generator that yields nothing

    def release(self) -> None:
        """Hand back what the finished sequence's drafter holds (a draft model's cache slot)."""

    def share_context(self, target: Any, target_cache: Any) -> None:
        """Told the target's cache: a self-draft copies context it has not seen from there."""

    @property
    def reads_target_cache(self) -> bool:
        """Whether proposals copy context from the target's cache (so the target must read a
        prompt before the first draft)."""
        return False


DrafterFactory = Callable[[], Drafter]


@dataclass(frozen=True)
class DraftFeed:
    """A draft model pass a proposal waits for: feed `token_ids` [n] into `cache`, send back
    the last position's logits [1, columns]. Batches feed many sequences' in one pass."""
    model: Any  # a CausalLM
    token_ids: torch.Tensor
    cache: Any


# A proposal in steps: yields DraftFeeds, is sent their logits, returns the DraftProposal.
ProposalSteps = Generator[DraftFeed, torch.Tensor, DraftProposal]


def run_alone(steps: ProposalSteps) -> DraftProposal:
    """Drive a proposal's steps with one pass per feed (no batch)."""
    try:
        feed = next(steps)
        while True:
            feed = steps.send(feed.model.forward(feed.token_ids, feed.cache, num_logits=1))
    except StopIteration as done:
        return done.value


class SteppedDrafter(Drafter):
    """A drafter written as `proposal_steps`; `propose` runs them alone."""

    def propose(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> DraftProposal:
        return run_alone(self.proposal_steps(context, k, params, generator))

    def proposal_steps(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> ProposalSteps:
        raise NotImplementedError


def empty_proposal(device: torch.device | str = "cpu") -> DraftProposal:
    return DraftProposal(torch.empty(0, dtype=torch.long, device=device), None, 0, 0)
