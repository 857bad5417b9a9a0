"""Drafting with a feature head: the target's own hidden states, rolled forward k steps.

Entry i of the head's cache reads (token t_{i+1}, target feature f_i) and predicts f_{i+1}. Before
each proposal the head catches up on the positions the target has read since its last one
(after a verdict: the accepted drafts and the token before them) with the target's true
features, which the last verify pass left in the target's cache (backends/features.py); its
last row's prediction gives the first draft token, and each later one feeds its own prediction
back. Entries built on predictions are dropped afterwards (`observe`): the next catch-up
replaces them with the target's features.
"""
from __future__ import annotations

import torch

from ..backends.base import CausalLM
from ..backends.features import ExposesFeatures
from ..sampling_params import SamplingParams
from .base import DraftFeed, DraftProposal, ProposalSteps, empty_proposal
from .model import ModelDrafter


class FeatureDrafter(ModelDrafter):
    def __init__(self, model: CausalLM, rollout: bool = True) -> None:
        """rollout: greedy steps after the first run as the model's greedy_rollout where it has
        one (the GPU's graphs: no host work between them; the head is never batched, so
        nothing is lost by not yielding them). False: one yielded feed per step (to compare)."""
        super().__init__(model)
        self._rolls_out = rollout and hasattr(model, "greedy_rollout")
        self._target: ExposesFeatures | None = None
        self._target_cache: object | None = None

    def share_context(self, target: CausalLM, target_cache: object) -> None:
        if not isinstance(target, ExposesFeatures):
            raise TypeError(f"target {target.name!r} does not expose its hidden states")
        self._target, self._target_cache = target, target_cache
        target.keep_features(target_cache)

    @property
    def reads_target_cache(self) -> bool:
        return True  # the prompt's features come from the target's own pass over it

    def proposal_steps(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> ProposalSteps:
        if self._target is None:
            raise RuntimeError("a feature drafter needs share_context(target, cache) before it proposes")
        if self.cache is None:
            self.cache = self.model.new_cache()
        self.model.cover_context(self.cache, context)
        self._token_ids = self.model.column_token_ids(self.cache)
        length = context.shape[0]
        if length < 2:  # a one-token prompt: no feature of the target's yet
            return empty_proposal(context.device)
        # Entries held: those of positions the target verified; the target's cache holds every
        # position but the newest token's, so its features reach length - 2.
        held = self.model.cache_length(self.cache)
        self.cache.features_in = self._target.take_features(self._target_cache, held, length - 1)
        new_tokens = context[held + 1 :]
        logits = yield DraftFeed(self.model, new_tokens, self.cache)
        tokens, probs = [], []
        for i in range(k):
            if i and self._rolls_out and params.greedy:  # the rest in one go, on the device
                tokens.append(self.model.greedy_rollout(self.cache, tokens[-1], k - i))
                probs.append(None)
                break
            if i:
                self.cache.features_in = self.cache.predicted
                logits = yield DraftFeed(self.model, tokens[-1], self.cache)
            token, token_probs = self._pick(logits, params, generator)
            token, token_probs = self._to_vocabulary(token, token_probs)
            tokens.append(token)
            probs.append(token_probs)
        self._context_length = length - 1  # entries from here on read predicted features
        self._drafts_in_cache = 0
        return DraftProposal(
            torch.cat(tokens),
            torch.cat(probs) if probs[0] is not None else None,
            forward_passes=k,
            positions=new_tokens.shape[0] + k - 1,
        )
