"""The interface the engine needs from a model: forward over new tokens into a KV cache, and rewind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch


class CausalLM(Protocol):
    """A causal LM with a per-sequence KV cache.

    The cache is an opaque object owned by one sequence (`new_cache()`); the model's weights
    are shared. Rewinding is bookkeeping on that cache, never a recomputation.
    """

    name: str
    vocab_size: int  # token ids the model reads and names: [0, vocab_size)
    # None: logits cover the whole vocabulary. Else the token id of each logits column, for
    # drafts whose head scores only a subset (the rest have draft probability zero).
    output_token_ids: torch.Tensor | None
    max_context: int  # positions the model can attend over
    device: torch.device
    eos_token_ids: frozenset[int]

    def new_cache(self) -> Any: ...

    def prefill(self, token_ids: torch.Tensor, cache: Any) -> None:
        """Write [n] tokens into the cache; no logits are needed."""

    def forward(self, token_ids: torch.Tensor, cache: Any, num_logits: int) -> torch.Tensor:
        """Feed [n] new tokens; return float logits [num_logits, columns] for the last num_logits
        positions (columns: vocab_size, or len(output_token_ids))."""

    def cache_length(self, cache: Any) -> int: ...

    def rewind(self, cache: Any, length: int) -> None:
        """Forget every cached position at or after `length`."""


@dataclass(frozen=True)
class BatchLayout:
    """The rows a model's batched pass computes for feeds of given widths: what a verify pass
    costs is a function of these rows, not of the tokens fed. Packed (llama.cpp, the compact
    decoder): the sum of the widths. Padded (the GPU's batched graphs): every feed padded to
    the widest, and the sequences to the graph's batch size (`padded_batch(n)`), so a draft
    position below the widest costs the pass nothing and one above it costs a row per sequence."""

    padded_batch: Callable[[int], int] | None = None  # None: packed

    def rows(self, widths: list[int]) -> int:
        if self.padded_batch is None or not widths:
            return sum(widths)
        return self.padded_batch(len(widths)) * max(widths)

    def added_rows(self, sequences: int, width: int, widest: int) -> int:
        """Rows one more token adds to a feed of `width` among `sequences` whose widest is `widest`."""
        if self.padded_batch is None:
            return 1
        return self.padded_batch(sequences) if width >= widest else 0


PACKED = BatchLayout()


def reads_prompts_in_batches(model: Any) -> bool:
    """Whether a request joining a batch should have its prompt read in the batch's shared pass,
    its rows beside the others' (BatchStepper), rather than in a pass of its own first: where
    one pass over both rows costs less than the two it replaces. Measured per backend (2 cores,
    a 120-token prompt beside seven one-token feeds; H100, 8B): the compact decoder's packed
    pass 276-333 ms against 325-372, the GPU's join graphs 10.9 against 17.6 ms; llama.cpp's
    mixed batch 250-273 against 203-230 ms, so it reads prompts apart."""
    return bool(getattr(model, "prompts_join_batches", False))


def batch_layout(model: Any) -> BatchLayout:
    """How `model` lays out a batched pass (models that do not say pack theirs)."""
    return getattr(model, "batch_layout", PACKED)


def forward_batch(model: CausalLM, token_ids: list[torch.Tensor], caches: list[Any],
                  num_logits: list[int]) -> list[torch.Tensor]:
    """Feed each sequence its new tokens [n_i]; logits [num_logits_i, columns] each. Models
    that can (compact and graph decoders) run one pass over all rows; others one per sequence."""
    batched = getattr(model, "forward_batch", None)
    if batched is not None:
        return batched(token_ids, caches, num_logits)
    return [model.forward(t, c, m) for t, c, m in zip(token_ids, caches, num_logits)]


def pinned(tokens: torch.Tensor) -> torch.Tensor:
    """Host tokens in page-locked memory, so that their copy to the GPU is queued rather than
    waited for: to stage a pageable copy the driver may wait for the stream to drain, and the
    graph launched after it then starts on an idle GPU (with this and verify_greedy reading
    host drafts on the host, an 8B/1B step at alpha 0.9, k 6 went from 16.15 to 15.19 ms).
    PyTorch's pinned-memory cache keeps the block until the queued copy has read it. Call it
    only where CUDA is present; tensors already on a device pass through."""
    return tokens.pin_memory() if tokens.device.type == "cpu" else tokens
