"""The interface the engine needs from a model: forward over new tokens into a KV cache, and rewind."""
from __future__ import annotations

from typing import Any, Protocol

import torch


class CausalLM(Protocol):
    """A causal LM with a per-sequence KV cache.

    The cache is an opaque object owned by one sequence (`new_cache()`); the model's weights
    are shared. Rewinding is bookkeeping on that cache, never a recomputation.
    """

    name: str
    vocab_size: int  # size of the logits dimension
    max_context: int  # positions the model can attend over
    device: torch.device
    eos_token_ids: frozenset[int]

    def new_cache(self) -> Any: ...

    def prefill(self, token_ids: torch.Tensor, cache: Any) -> None:
        """Write [n] tokens into the cache; no logits are needed."""

    def forward(self, token_ids: torch.Tensor, cache: Any, num_logits: int) -> torch.Tensor:
        """Feed [n] new tokens; return float logits [num_logits, vocab] for the last num_logits positions."""

    def cache_length(self, cache: Any) -> int: ...

    def rewind(self, cache: Any, length: int) -> None:
        """Forget every cached position at or after `length`."""
