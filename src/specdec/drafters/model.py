"""A smaller causal LM sharing the target's vocabulary drafts k tokens autoregressively.

The draft's head may score only a subset of the vocabulary (model.output_token_ids): picks
are mapped back to token ids, and its distribution is spread over the full vocabulary with
zeros elsewhere, which is what the rejection rule needs as q.
"""
from __future__ import annotations

import torch

from ..backends.base import CausalLM, CoversContext, SharesContext
from ..logits import sample, to_probs
from ..sampling_params import SamplingParams
from .base import DraftFeed, DraftProposal, ProposalSteps, SteppedDrafter


class ModelDrafter(SteppedDrafter):
    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.cache = None  # taken at the first proposal, on the thread that steps the sequence
        self._context_length = 0
        self._drafts_in_cache = 0
        # Drafts with a subset head may extend it per sequence with the context's own tokens.
        self._covers_context = isinstance(model, CoversContext)
        self._token_ids: torch.Tensor | None = None  # logits column -> token id, this proposal
        self._context_source: tuple[CausalLM, object] | None = None  # (target, its cache): see share_context

    def release(self) -> None:
        if self.cache is not None:  # a second release of it does nothing
            self.model.release(self.cache)

    def share_context(self, target: CausalLM, target_cache: object) -> None:
        """Where the draft renders the target's own model (a self-draft), context it has not
        seen (the prompt, tokens another drafter proposed) is copied from the target's cache
        instead of run through the draft."""
        if isinstance(self.model, SharesContext) and self.model.renders_same_model(target):
            self._context_source = (target, target_cache)

    @property
    def reads_target_cache(self) -> bool:
        """Whether proposals copy context from the target's cache (so the target reads a
        prompt before the first draft)."""
        return self._context_source is not None

    def proposal_steps(
        self, context: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> ProposalSteps:
        """k draft passes, each yielded as a DraftFeed (batching.py feeds many sequences' at once)."""
        if self.cache is None:
            self.cache = self.model.new_cache()
        if self._covers_context:
            self.model.cover_context(self.cache, context)
            self._token_ids = self.model.column_token_ids(self.cache)
        else:
            self._token_ids = self.model.output_token_ids
        if self._context_source is not None:
            target, target_cache = self._context_source
            # The target's cache holds the context but its last token (generation.py), which
            # is fed here: its logits are the first draft's.
            have = min(target.cache_length(target_cache), context.shape[0] - 1)
            if have > self.model.cache_length(self.cache):
                self.model.adopt_context(self.cache, target_cache, have)
        # The cache holds an accepted prefix of `context` (observe() rewound it); feed the rest.
        new_tokens = context[self.model.cache_length(self.cache) :]
        logits = yield DraftFeed(self.model, new_tokens, self.cache)  # [1, vocab]
        tokens, probs = [], []
        for i in range(k):
            if i:
                logits = yield DraftFeed(self.model, tokens[-1], self.cache)
            token, token_probs = self._pick(logits, params, generator)
            if self._token_ids is not None:
                token, token_probs = self._to_vocabulary(token, token_probs)
            tokens.append(token)
            probs.append(token_probs)
        self._context_length = context.shape[0]
        self._drafts_in_cache = max(k - 1, 0)  # the last draft is never fed back
        return DraftProposal(
            torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long, device=context.device),
            torch.cat(probs) if probs and probs[0] is not None else None,
            forward_passes=max(k, 1),
            positions=new_tokens.shape[0] + max(k - 1, 0),
        )

    def observe(self, num_accepted: int) -> None:
        if self.cache is None:
            return
        keep = self._context_length + min(num_accepted, self._drafts_in_cache)
        self.model.rewind(self.cache, keep)

    def _to_vocabulary(
        self, column: torch.Tensor, column_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        token_ids = self._token_ids.to(column.device)
        if column_probs is None:
            return token_ids[column], None
        probs = column_probs.new_zeros(column_probs.shape[0], self.model.vocab_size)
        probs[:, token_ids] = column_probs
        return token_ids[column], probs

    @staticmethod
    def _pick(
        logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # logits: [1, vocab] -> token [1], probs [1, vocab] or None when greedy
        if params.greedy:
            return logits.argmax(dim=-1), None
        probs = to_probs(logits, params)
        return sample(probs, generator), probs
