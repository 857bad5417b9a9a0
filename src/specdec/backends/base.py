"""The interface the engine needs from a model: forward over new tokens into a KV cache, and rewind."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch


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


class CausalLM(ABC):
    """A causal LM with a per-sequence KV cache: what the decoding loop needs of a backend.

    The cache is an opaque object owned by one sequence (`new_cache()`); the model's weights
    are shared. Rewinding is bookkeeping on that cache, never a recomputation. Every backend
    implements the five abstract methods; the capabilities below them have defaults that a
    backend overrides where it can do better (a packed batched pass, a pool of slots).
    """

    name: str
    vocab_size: int  # token ids the model reads and names: [0, vocab_size)
    # None: logits cover the whole vocabulary. Else the token id of each logits column, for
    # drafts whose head scores only a subset (the rest have draft probability zero).
    output_token_ids: torch.Tensor | None = None
    max_context: int  # positions the model can attend over
    device: torch.device
    eos_token_ids: frozenset[int]
    # Sequences it holds at once, where the backend bounds them (llama.cpp's sequence ids).
    max_sequences: int | None = None
    # Cache positions that all its sequences share (llama.cpp's unified cache); None: each
    # sequence's cache is its own. A server reserves a request's whole span of these at admission.
    kv_cells: int | None = None
    # Whether a request joining a batch should have its prompt read in the batch's shared pass,
    # its rows beside the others' (BatchStepper), rather than in a pass of its own first: where
    # one pass over both costs less than the two it replaces. Measured per backend (2 cores, a
    # 120-token prompt beside seven one-token feeds; H100, 8B): the compact decoder's packed pass
    # 276-333 ms against 325-372, the GPU's join graphs 10.9 against 17.6 ms; llama.cpp's mixed
    # batch 250-273 against 203-230 ms, so it reads prompts apart.
    prompts_join_batches: bool = False
    batch_layout: BatchLayout = PACKED  # how a batched pass lays out its rows (its cost model)

    def agreed_draft_lengths(self, ks: list[int]) -> list[int]:
        """The draft lengths this step runs with, given those proposed here (k follows measured
        timings): the proposed ones. A model split over processes (tensor_parallel.py) takes
        rank 0's, so that every rank runs the same passes."""
        return ks

    @abstractmethod
    def new_cache(self) -> Any:
        """A new sequence's cache. Call it (and every other method) from the thread that runs
        the model's passes: llama.cpp and the GPU pool are not safe across threads."""

    @abstractmethod
    def prefill(self, token_ids: torch.Tensor, cache: Any) -> None:
        """Write [n] tokens into the cache; no logits are needed."""

    @abstractmethod
    def forward(self, token_ids: torch.Tensor, cache: Any, num_logits: int) -> torch.Tensor:
        """Feed [n] new tokens; return float logits [num_logits, columns] for the last num_logits
        positions (columns: vocab_size, or len(output_token_ids))."""

    @abstractmethod
    def cache_length(self, cache: Any) -> int: ...

    @abstractmethod
    def rewind(self, cache: Any, length: int) -> None:
        """Forget every cached position at or after `length`."""

    # ---- capabilities with defaults ----------------------------------------------------------
    def release(self, cache: Any) -> None:
        """Hand a finished sequence's cache back now (to a pool of slots); a second release of
        the same cache does nothing. Default: nothing is pooled, the cache is just dropped."""

    @property
    def free_sequences(self) -> int | None:
        """Sequences that could start now, where the backend bounds them; None: unbounded."""
        return None

    def reserve_sequences(self, count: int) -> None:
        """Prepare for `count` sequences running together (a server's batch). Default: nothing."""

    def forward_batch(self, token_ids: list[torch.Tensor], caches: list[Any],
                      num_logits: list[int]) -> list[torch.Tensor]:
        """Feed each sequence its new tokens [n_i]; logits [num_logits_i, columns] each, in
        tensors that outlive the next pass. Default: one pass per sequence."""
        return [self.forward(t, c, m) for t, c, m in zip(token_ids, caches, num_logits)]

    def flops_per_token(self) -> float:
        """Estimated compute per processed position (~2 FLOPs per weight of every linear layer,
        the output head included); 0.0 where unknown. What the k policy assumes when it must
        not depend on timings."""
        return 0.0


class ChainsGreedySteps(ABC):
    """A model that runs plain greedy decoding with the next step queued on the device before
    the host reads this one's token (GraphDecoder's GreedyChain)."""

    @abstractmethod
    def greedy_chain(self, cache: Any, last_token: int) -> Any: ...


class SharesContext(ABC):
    """A draft that can copy context from the target's own cache instead of computing it
    (a self-draft rendering the target's own model)."""

    @abstractmethod
    def renders_same_model(self, other: object) -> bool: ...

    @abstractmethod
    def adopt_context(self, cache: Any, source: Any, length: int) -> None: ...


class CoversContext(ABC):
    """A draft whose subset head is extended per sequence with the context's own tokens."""

    @abstractmethod
    def cover_context(self, cache: Any, context: torch.Tensor) -> None: ...

    @abstractmethod
    def column_token_ids(self, cache: Any) -> torch.Tensor | None: ...


def pinned(tokens: torch.Tensor) -> torch.Tensor:
    """Host tokens in page-locked memory, so that their copy to the GPU is queued rather than
    waited for: to stage a pageable copy the driver may wait for the stream to drain, and the
    graph launched after it then starts on an idle GPU (with this and verify_greedy reading
    host drafts on the host, an 8B/1B step at alpha 0.9, k 6 went from 16.15 to 15.19 ms).
    PyTorch's pinned-memory cache keeps the block until the queued copy has read it. Call it
    only where CUDA is present; tensors already on a device pass through."""
    return tokens.pin_memory() if tokens.device.type == "cpu" else tokens
