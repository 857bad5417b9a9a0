"""llama.cpp backend (through llama-cpp-python's low-level API): GGUF models on CPU.

llama.cpp reads quantized weights directly (Gemma 3 270M Q4_K_M: 253 MB per token instead of
1.07 GB in float32), so plain decoding is several times faster than float32 torch. The engine
drives it like any `CausalLM`: one batched decode of [last, d1..dk] with logits requested only
at those positions, and rollback by removing a sequence's cache positions >= the accepted length.

One llama.cpp context holds up to `max_sequences` sequences (one per in-flight generation);
each `new_cache()` takes a free sequence id and `release()` hands it back. llama.cpp is not
safe across threads: every call on a model, these two included, must come from the thread
that runs its passes (a server's scheduler thread), which is why nothing here is left to a
garbage collector's finaliser, which runs on whatever thread drops the last reference.

Where the GGUF's output head is Q8_0 (the default Gemma's), llama.cpp runs the model without
its head and our product computes the logits of all verified positions in one pass over the
head (llama_cpp_head.py): verifying five positions then costs 22 ms instead of 43.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError, SpecDecError
from .base import CausalLM
from .features import ExposesFeatures, FeatureLog, record_features
from .llama_cpp_head import SplitHead


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet_llama_logs() -> None:
    # llama.cpp logs every graph node at load; the low-level API does not set the level the
    # high-level `Llama(verbose=False)` does, so do it here: errors only.
    try:
        from llama_cpp._logger import set_verbose
    except ImportError:  # pragma: no cover - other llama-cpp-python layouts
        return
    set_verbose(False)


@dataclass
class SequenceSlot:
    """A sequence's place in the shared llama.cpp KV cache."""

    seq_id: int | None  # None once released
    length: int = 0
    feature_log: FeatureLog | None = None  # kept for a feature drafter (backends/features.py)


class LlamaCppCausalLM(CausalLM, ExposesFeatures):
    prompts_join_batches = False  # a prompt in a mixed batch costs more than apart (base.CausalLM)

    def __init__(self, path: str | Path, name: str | None = None, n_ctx: int = 8192, max_sequences: int = 32,
                 n_threads: int | None = None, n_batch: int = 512, split_head: SplitHead | None = None) -> None:
        """split_head: the checked split head that computes the logits (llama_cpp_split.split_head_for);
        None (or False): llama.cpp's own head."""
        import llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

        self._lib = llama_cpp
        _quiet_llama_logs()
        llama_cpp.llama_backend_init()
        path = Path(path)
        self.path = path
        self.name = name or path.name
        self._head = split_head or None
        model_params = llama_cpp.llama_model_default_params()
        try:
            model_file = self._head.body if self._head else path
            self._model = LlamaModel(path_model=str(model_file), params=model_params, verbose=False)
        except ValueError as exc:
            raise ModelLoadError(f"llama.cpp cannot load {path}: {exc}") from exc
        params = llama_cpp.llama_context_default_params()
        # SPECDEC_THREADS: a replica's share of the cores (server/replicas.py), not all of them
        threads = n_threads or int(os.environ.get("SPECDEC_THREADS") or 0) or max(1, os.cpu_count() or 1)
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = max_sequences
        params.n_threads = params.n_threads_batch = threads
        # A sliding-window cache keeps only the window and cannot drop rejected positions;
        # the full-size one can, which speculative decoding needs.
        params.swa_full = True
        params.kv_unified = True  # sequences share one pool of n_ctx cells
        self._ctx = LlamaContext(model=self._model, params=params, verbose=False)
        self._threads = threads
        self._n_batch = n_batch
        self.output_token_ids = None
        self.max_context = min(n_ctx, int(self._model.n_ctx_train()))
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        if self._head:
            # The body model is fed embeddings and has no vocabulary: the source's is recorded.
            hidden = self._head.hidden
            self._batch = LlamaBatch(n_tokens=n_batch, embd=hidden, n_seq_max=1, verbose=False)
            self._embeddings = np.ctypeslib.as_array(self._batch.batch.embd, shape=(n_batch, hidden))
            self._logits = torch.empty(0, self._head.vocab_size)
            self.vocab_size = self._head.vocab_size
            self.eos_token_ids = frozenset(self._head.eos_token_ids)
        else:
            self._batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(self._model.model)
            self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
            eos = {int(llama_cpp.llama_vocab_eos(vocab)), int(llama_cpp.llama_vocab_eot(vocab))}
            self.eos_token_ids = frozenset(t for t in eos if t >= 0)
        self.feature_size = self._head.hidden if self._head else 0
        self.max_sequences = max_sequences  # sequences in flight at once (they share n_ctx cells)
        self.kv_cells = n_ctx  # cache cells every sequence's positions share (kv_unified)
        self._free = list(range(max_sequences))

    # ---- sequences ---------------------------------------------------------------------------
    def new_cache(self) -> SequenceSlot:
        if not self._free:
            raise RuntimeError(f"all {self.max_sequences} llama.cpp sequence slots are in use: close() the "
                               "generations that are done with")
        slot = SequenceSlot(self._free.pop())
        self._ctx.kv_cache_seq_rm(slot.seq_id, 0, -1)
        return slot

    def release(self, cache: SequenceSlot) -> None:
        """The sequence is finished: its cells are cleared and its id goes to the next one now.
        A second release of the same cache does nothing."""
        if cache.seq_id is None:
            return
        if self._ctx.ctx is not None:
            self._ctx.kv_cache_seq_rm(cache.seq_id, 0, -1)
        self._free.append(cache.seq_id)
        cache.seq_id = None  # a released cache must not touch the id's next owner

    @property
    def free_sequences(self) -> int:
        return len(self._free)

    def cache_length(self, cache: SequenceSlot) -> int:
        return cache.length

    def rewind(self, cache: SequenceSlot, length: int) -> None:
        if length > cache.length:
            raise ValueError(f"cannot rewind a cache of {cache.length} positions to {length}")
        if length < cache.length:
            self._ctx.kv_cache_seq_rm(cache.seq_id, length, -1)
            cache.length = length

    # ---- forward passes ----------------------------------------------------------------------
    def prefill(self, token_ids: torch.Tensor, cache: SequenceSlot) -> None:
        ids = token_ids.tolist()
        for start in range(0, len(ids), self._n_batch):
            self._decode(ids[start : start + self._n_batch], cache, num_logits=0)

    @property
    def split_head(self) -> bool:
        """Whether our head product computes the logits (llama_cpp_head.py)."""
        return self._head is not None

    def forward(self, token_ids: torch.Tensor, cache: SequenceSlot, num_logits: int) -> torch.Tensor:
        """Logits [num_logits, vocab], valid until this model's next forward: a view of llama.cpp's
        own output buffer (its requested rows are contiguous, in batch order), or of ours with
        the split head. Copying 262k floats per verified position cost ~0.5 ms a row against a
        ~16 ms step."""
        ids = token_ids.tolist()
        if len(ids) > self._n_batch:
            self.prefill(token_ids[: len(ids) - num_logits], cache)
            ids = ids[len(ids) - num_logits :]
        return self._head_logits(self._decode(ids, cache, num_logits), fresh=False)

    def forward_batch(self, token_ids: list[torch.Tensor], caches: list[SequenceSlot],
                      num_logits: list[int]) -> list[torch.Tensor]:
        """Every sequence's new tokens in one llama.cpp decode (its batches take several
        sequences), and the head once over all their rows: logits [num_logits_i, vocab] each,
        in tensors of their own (a server's batch holds them past the next forward)."""
        groups: list[list[tuple[list[int], SequenceSlot, int]]] = [[]]
        size = 0  # tokens in the last group: a group is what one llama.cpp batch holds
        for ids, cache, count in zip(token_ids, caches, num_logits):
            ids = ids.tolist()
            if groups[-1] and size + len(ids) > self._n_batch:
                groups.append([])
                size = 0
            groups[-1].append((ids, cache, count))
            size += len(ids)
        out: list[torch.Tensor] = []
        for group in groups:
            if len(group) == 1 and len(group[0][0]) > self._n_batch:  # longer than a batch: its own passes
                ids, cache, count = group[0]
                out.append(self.forward(torch.tensor(ids), cache, count).clone())
            elif group:
                rows = self._head_logits(self._decode_segments(group), fresh=True)
                out.extend(rows.split([count for _, _, count in group]))
        return out

    def _head_logits(self, rows: np.ndarray, fresh: bool) -> torch.Tensor:
        """rows: what llama.cpp output at the positions that want logits (the split head's
        hidden states, or llama.cpp's own logits)."""
        if not self._head:
            return torch.from_numpy(rows.copy() if fresh else rows)
        if fresh:
            return self._head.logits(rows, self._threads)
        if self._logits.shape[0] < rows.shape[0]:
            self._logits = torch.empty(rows.shape[0], self.vocab_size)
        return self._head.logits(rows, self._threads, out=self._logits)

    def _decode(self, ids: list[int], cache: SequenceSlot, num_logits: int) -> np.ndarray:
        if not ids:
            return np.empty((0, self._head.hidden if self._head else self.vocab_size), np.float32)
        return self._decode_segments([(ids, cache, num_logits)])

    def _decode_segments(self, segments: list[tuple[list[int], SequenceSlot, int]]) -> np.ndarray:
        """One llama.cpp decode of several sequences' tokens; llama.cpp's output rows [sum num_logits, width]
        at each one's last num_logits positions. A sequence that keeps its features has every
        position output (the split head's hidden states), kept in its cache's feature log."""
        batch = self._batch.batch
        batch.n_tokens = sum(len(ids) for ids, _, _ in segments)
        if self._head:
            self._embeddings[: batch.n_tokens] = self._head.embed([t for ids, _, _ in segments for t in ids])
        outputs = [len(ids) if cache.feature_log is not None else num_logits for ids, cache, num_logits in segments]
        i = 0
        for (ids, cache, _), count in zip(segments, outputs):
            for j in range(len(ids)):
                if not self._head:
                    batch.token[i] = ids[j]
                batch.pos[i] = cache.length + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = cache.seq_id
                batch.logits[i] = j >= len(ids) - count
                i += 1
        self._ctx.decode(self._batch)
        pointer = self._lib.llama_get_logits(self._ctx.ctx)
        width = self._head.hidden if self._head else self.vocab_size
        rows = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                     shape=(sum(outputs), width))
        if all(cache.feature_log is None for _, cache, _ in segments):
            wanted = rows  # the output is the logits' rows, in batch order
        else:
            parts, start = [], 0
            for (_, cache, num_logits), count in zip(segments, outputs):
                # a view of llama.cpp's buffer: the log copies what it keeps
                record_features(cache, cache.length, torch.from_numpy(rows[start : start + count]))
                parts.append(rows[start + count - num_logits : start + count])
                start += count
            wanted = np.concatenate(parts)
        for ids, cache, _ in segments:
            cache.length += len(ids)
        return wanted

    # ---- what a feature draft reads (backends/features.py) ----------------------------------
    def keep_features(self, cache: SequenceSlot) -> None:
        if not self._head:
            raise SpecDecError(f"{self.name}: llama.cpp gives the hidden states a feature head reads only where "
                               "its split head applies (Q8_0 or Q6_K heads; SPECDEC_LLAMA_CPP_HEAD unset)")
        super().keep_features(cache)

    def input_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._head.embed(token_ids.tolist()))

    def head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._head.head_rows(token_ids.tolist()))

