"""The GPU path: a static KV cache and CUDA graphs of the decode, draft and verify steps.

At batch 1 a GPU decode step should cost one read of the weights (an 8B model in bf16:
16 GB at ~3.35 TB/s on an H100, ~4.8 ms). An eager Python loop instead spends most of the
step launching a few hundred small kernels. Each step here has a fixed shape (1 token for a
decode or draft step, k+1 for a verify), so each shape is captured once as a CUDA graph over
a cache of fixed capacity, and replayed: positions travel as a device tensor, a rewind is a
change of the length, and nothing in a step waits for the host.

The decoder is composed of: its cache (static_cache.py: slots leased to sequences, a pool
for a server's batch), its step shapes and their capture (step_graphs.py), the fused layers
(fused_layers.py), attention in PyTorch's kernels (grouped_attention.py) and plain greedy
decoding a step ahead of the host (greedy_chain.py).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import trace
from ..kernels import gpu_kernels
from .base import PACKED, BatchLayout, ChainsGreedySteps, pinned
from .compact_decoder import PREFILL_CHUNK, CompactDecoder
from .features import record_features
from .fused_layers import FusedLayers, why_kernels_do_not_apply
from .greedy_chain import GreedyChain
from .grouped_attention import GroupedAttention
from .layers import Int8Weight, UnsupportedArchitecture, Weight, attention_mask, linear
from .static_cache import Slot, SlotLeases, StaticCache
from .step_graphs import (
    GRAPH_MAX_TOKENS,
    JOIN_PIECE,
    JOIN_PIECES_STEP,
    MAX_GRAPH_BATCH,
    MAX_JOIN_PIECES,
    MIN_PROMPT_WIDTH,
    PADDED,
    BatchStep,
    GraphCapture,
    graph_batch_size,
    join_layout,
    prompts_that_join,
)
from .step_graphs import pieces as count_pieces

log = logging.getLogger("specdec")

DEFAULT_CAPACITY = 4096  # positions per sequence; the model's max_context is capped to it


class GraphDecoder(CompactDecoder, ChainsGreedySteps):
    """CompactDecoder with a static cache and, on CUDA, one captured graph per step size."""

    def __init__(self, model: nn.Module, name: str, dtype: torch.dtype, eos_token_ids: set[int],
                 vocab_size: int, capacity: int = DEFAULT_CAPACITY, kernels: bool | None = None,
                 int8_weights: bool = False) -> None:
        """kernels: run steps of up to gpu_kernels.MAX_ROWS positions through the Triton kernels of
        gpu_kernels (None: wherever they apply on CUDA, unless SPECDEC_GPU_KERNELS=0; True off
        CUDA runs them in Triton's interpreter, for tests). int8_weights: weight-only int8
        products (a draft's steps read half the bytes)."""
        super().__init__(model, name, dtype, eos_token_ids, vocab_size, int8_weights=int8_weights)
        self.capacity = min(capacity, self.max_context)
        self.max_context = self.capacity
        self._leases = SlotLeases(len(self._layers), self._kv_heads, self.capacity, self._head_dim, self.dtype,
                                  self.device)
        self._batch_steps: dict[tuple[int, int], BatchStep] = {}
        self._prompt_steps: dict[tuple[int, int], BatchStep] = {}  # (width, 1): pooled prompts
        self._join_steps: dict[int, BatchStep] = {}  # pieces: prompts that join a batch's pass
        self._logits_buffer: torch.Tensor | None = None  # the batched steps' logits (see _batch_step)
        self._capture_graphs = GraphCapture(self.device)
        self._graphs = self._capture_graphs.enabled  # off CUDA every step runs eagerly
        self._attention_heads = GroupedAttention(self._heads, self._kv_heads, self._head_dim, self.dtype)
        self._fused = FusedLayers(self._layers, self._final_norm, self._eps, self.dtype, self._product, self._reduce)
        self._offsets = torch.arange(GRAPH_MAX_TOKENS, device=self.device)
        self._key_positions = torch.arange(self.capacity, device=self.device)
        reason = why_kernels_do_not_apply(model, self._layers, self.dtype, self._head_dim)
        if kernels and reason:
            raise ValueError(f"the fused GPU kernels do not apply: {reason}")
        if kernels is None:  # SPECDEC_GPU_KERNELS=0 turns them off where a caller cannot say so
            kernels = self.device.type == "cuda" and reason is None and os.environ.get("SPECDEC_GPU_KERNELS") != "0"
        self.kernels = kernels

    # ---- CausalLM ----------------------------------------------------------------------------
    def new_cache(self) -> StaticCache:
        return self._leases.lease()

    def release(self, cache: StaticCache) -> None:
        """The sequence is finished: its slot goes to the next one now. A second release does nothing."""
        self._leases.end(cache)

    @torch.inference_mode()
    def reserve_sequences(self, count: int) -> None:
        """Make room for `count` sequences whose steps run together (a server's batch): their
        caches come from one pool, so a batch of them runs as one captured graph. On CUDA the
        graphs for every batch size up to `count` and every feed width are captured now, so
        that no request waits for a capture (or a kernel compile) mid-stream. Once per
        decoder; sequences beyond the pool get slots of their own, and batches holding one of
        those run eagerly. Costs count x (one sequence's cache) of device memory."""
        if self._leases.pool is not None:
            if count > self._leases.pool.count:
                log.warning("%s: %d pooled sequences already reserved; %d asked", self.name, self._leases.pool.count,
                            count)
            return
        self._leases.make_pool(count)
        if not self.kernels:  # batches then take the packed pass over the pooled slots
            return
        largest = graph_batch_size(min(count, MAX_GRAPH_BATCH))
        self._logits_buffer = torch.empty(largest * GRAPH_MAX_TOKENS, self._head.shape[0], dtype=torch.float32,
                                          device=self.device)
        if self._graphs:
            size = 1
            while size <= largest:
                for width in range(1, GRAPH_MAX_TOKENS + 1):
                    self._batch_step(size, width)
                size *= 2
            width = MIN_PROMPT_WIDTH
            while width <= min(PREFILL_CHUNK, self.capacity):
                self._prompt_step(width)
                width *= 2
            for pieces in range(JOIN_PIECES_STEP, MAX_JOIN_PIECES + 1, JOIN_PIECES_STEP):
                self._join_step(pieces)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache: StaticCache, num_logits: int) -> torch.Tensor:
        """Logits [num_logits, vocab]. From a graph they live in the slot's output buffer,
        valid until this decoder's next graph step on any cache: the graphs share one memory
        pool, so a later replay may reuse the buffer (copy logits that must outlive it)."""
        trace.mark("forward", self)
        n = token_ids.shape[0]
        self._check_room(cache, n)
        if n > GRAPH_MAX_TOKENS or not self._graphs:
            return super().forward(token_ids, cache, num_logits)
        if self.kernels and self._batchable(cache, n):  # a pooled slot: the batch graphs serve it
            return self._batched_step([token_ids], [cache], [num_logits])[0]
        slot = cache.slot
        slot.start.fill_(cache.length)
        if n not in slot.graphs:
            self._capture(slot, n)
        slot.inputs[n].copy_(pinned(token_ids), non_blocking=True)
        self._stage_inputs(cache, n)
        slot.graphs[n].replay()
        record_features(cache, cache.length, slot.hidden[n])
        cache.length += n
        return slot.outputs[n][n - num_logits :]

    def _stage_inputs(self, cache: StaticCache, n: int) -> None:
        """Before a graph step of n tokens: what else its inputs hold (a feature head's features)."""

    @torch.inference_mode()
    def forward_batch(self, token_ids: list[torch.Tensor], caches: list[StaticCache],
                      num_logits: list[int]) -> list[torch.Tensor]:
        """Several sequences' new tokens; pooled sequences feeding up to GRAPH_MAX_TOKENS each
        run as one batched graph (eagerly off CUDA), others one by one (a prompt: its own
        graph). Without a pool or the fused kernels: CompactDecoder's packed pass.
        Returns each sequence's logits [num_logits_i, vocab], its own tensor."""
        if not self.kernels or self._leases.pool is None:
            return super().forward_batch(token_ids, caches, num_logits)
        together = [i for i, (t, c) in enumerate(zip(token_ids, caches)) if self._batchable(c, t.shape[0])]
        results: list[torch.Tensor | None] = [None] * len(caches)
        prompts = prompts_that_join(token_ids, caches, together)
        if prompts:  # new sequences' prompts (a draft's first feed is one) and the batch: one pass
            batch, together = together[:MAX_GRAPH_BATCH], together[MAX_GRAPH_BATCH:]
            for i, rows in zip(prompts + batch, self._pass_with_prompts(token_ids, caches, num_logits, prompts, batch)):
                results[i] = rows
        # Anything else runs on its own (a prompt joining no batch: its own graph); the batch
        # takes its graph.
        for i in [i for i, r in enumerate(results) if r is None and i not in together]:
            results[i] = self.forward(token_ids[i], caches[i], num_logits[i]).clone()
        for first in range(0, len(together), MAX_GRAPH_BATCH):
            part = together[first : first + MAX_GRAPH_BATCH]
            logits = self._batched_step([token_ids[i] for i in part], [caches[i] for i in part],
                                        [num_logits[i] for i in part])
            for i, rows in zip(part, logits):
                results[i] = rows
        return results

    @property
    def batch_layout(self) -> BatchLayout:
        """Pooled batches run as graphs padded to the widest feed and to a power-of-two batch
        size (per MAX_GRAPH_BATCH sequences); without them, CompactDecoder's packed pass."""
        return PACKED if not self.kernels or self._leases.pool is None else PADDED

    def _batched_step(self, token_ids: list[torch.Tensor], caches: list[StaticCache],
                      num_logits: list[int]) -> list[torch.Tensor]:
        sizes = [t.shape[0] for t in token_ids]
        width = max(sizes)
        for cache, n in zip(caches, sizes):
            self._check_room(cache, n)
        step = self._batch_step(graph_batch_size(len(caches)), width)
        keep = self._capture_graphs.run_step(step, token_ids, [b * width for b in range(len(caches))],
                                             [c.slot.index for c in caches], [c.length for c in caches], num_logits,
                                             self._leases.pool.spare)
        for cache, n in zip(caches, sizes):
            cache.length += n
        trace.mark("batched_step", self)
        # index_select copies: the next batched step overwrites the buffer they share.
        return list(step.output.index_select(0, keep).split(num_logits))

    def _batchable(self, cache: StaticCache, width: int) -> bool:
        """A feed that can join a batched graph: a pooled sequence's, narrow enough, with room
        for the padded width."""
        return (self._leases.pool is not None and cache.slot.index is not None and width <= GRAPH_MAX_TOKENS
                and cache.length + GRAPH_MAX_TOKENS <= self.capacity
                and cache.feature_log is None)  # batched graphs keep no features: its own graphs do

    def _batch_step(self, size: int, width: int) -> BatchStep:
        step = self._batch_steps.get((size, width))
        if step is None:
            def logits(step: BatchStep) -> torch.Tensor:
                # Into one buffer that every batched step shares: a graph's own output would
                # stay allocated for the life of the graph, ~4 GB over all shapes for an 8B model.
                rows = self._logits(self._batched_body(step))
                return self._logits_buffer[: rows.shape[0]].copy_(rows)
            step = self._batch_steps[(size, width)] = self._step_shape(size, width, logits)
        return step

    def _step_shape(self, size: int, width: int, output) -> BatchStep:
        return self._capture_graphs.step_shape(size, width, self._leases.pool.spare, output)

    def _batched_body(self, step: BatchStep) -> torch.Tensor:
        """The fused layers over a batch of pooled sequences, `step.width` rows each."""
        n, pool = step.width, self._leases.pool
        positions = (step.starts[:, None] + self._offsets[None, :n]).reshape(-1)
        hidden = self.embedding(step.tokens).float()
        rotary = self._rotary(positions.float())

        def cache(i, qkv, cos, sin, layer):
            gpu_kernels.write_kv_batch(qkv, cos, sin, pool.keys[i], pool.values[i], step.starts, step.slots, n,
                                       self._heads, self._kv_heads)
            return gpu_kernels.attend_batch(qkv, cos, sin, pool.keys[i], pool.values[i], step.starts, step.slots,
                                            n, self._heads, layer.scaling, layer.sliding_window)
        return self._fused.run(hidden, rotary, cache)

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, cache: StaticCache) -> None:
        self._check_room(cache, token_ids.shape[0])
        super().prefill(token_ids, cache)

    def cover_context(self, cache: StaticCache, context: torch.Tensor) -> None:
        return None  # the full head already covers every token

    @torch.inference_mode()
    def greedy_chain(self, cache: StaticCache, last_token: int) -> GreedyChain:
        """Plain greedy decoding after `last_token` (the one token not yet in the cache),
        with the device kept a step ahead of the host."""
        slot = cache.slot
        if self._graphs and slot.chain_graph is None:
            slot.start.fill_(cache.length)  # the capture's warm-up runs write past the length
            self._capture_chain(slot)  # before the input is set: warm-up runs overwrite it
        slot.chain_input.fill_(last_token)
        return GreedyChain(lambda: self._chain_step(cache), slot.chain_input, self._graphs)

    @torch.inference_mode()
    def _chain_step(self, cache: StaticCache) -> None:
        """One plain greedy step: feed slot.chain_input, write its argmax back into it."""
        self._check_room(cache, 1)
        slot = cache.slot
        slot.start.fill_(cache.length)
        if self._graphs:
            slot.chain_graph.replay()
        else:
            self._chain_body(slot)
        cache.length += 1

    def _chain_body(self, slot: Slot) -> None:
        logits = self._logits(self._static_body(slot.chain_input, slot))
        slot.chain_input.copy_(logits.argmax(dim=-1))  # the same argmax as verify_greedy's

    # ---- graphs ------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, sizes: range = range(1, GRAPH_MAX_TOKENS + 1), slots: int = 1) -> None:
        """Capture the step graphs now, so that no request pays for a capture mid-stream
        (a verify near the token budget feeds fewer tokens than the usual k+1)."""
        if not self._graphs:
            return
        caches = [self.new_cache() for _ in range(slots)]  # held together, so each is a distinct slot
        for cache in caches:
            cache.slot.start.fill_(0)
            for n in sizes:
                if n not in cache.slot.graphs:
                    self._capture(cache.slot, n)
            if cache.slot.chain_graph is None:
                self._capture_chain(cache.slot)
        for cache in caches:
            self.release(cache)

    def _capture(self, slot: Slot, n: int) -> None:
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        slot.inputs[n] = tokens
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def step() -> None:
            hidden = self._static_body(tokens, slot)
            outputs.append((hidden, self._logits(hidden)))
        slot.graphs[n] = self._capture_graphs.captured(step)
        slot.hidden[n], slot.outputs[n] = outputs[-1]  # the final hidden states are kept for feature heads

    def _capture_chain(self, slot: Slot) -> None:
        slot.chain_graph = self._capture_graphs.captured(lambda: self._chain_body(slot))

    # ---- the decoder over a static cache ----------------------------------------------------------
    def _body(self, token_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """Steps run outside a per-slot graph: up to GRAPH_MAX_TOKENS positions take the graphs'
        body eagerly; prompts take the pool's prompt graphs where they can, else the fused
        layers eagerly (or, without the kernels, the compact decoder's packed pass), which
        attend over the live part of the cache only."""
        n = token_ids.shape[0]
        if n > GRAPH_MAX_TOKENS and not self.kernels:
            return self._packed_body([token_ids], [cache])
        start = cache.length
        if n > GRAPH_MAX_TOKENS:
            width = max(MIN_PROMPT_WIDTH, 1 << (n - 1).bit_length())
            if cache.slot.index is not None and cache.length + width <= self.capacity:
                hidden = self._prompt_graph(token_ids, cache, width)
            else:
                hidden = self._fused_prompt(token_ids, cache)
        else:
            cache.slot.start.fill_(cache.length)
            hidden = self._static_body(token_ids.to(self.device), cache.slot)
            cache.length += token_ids.shape[0]
        record_features(cache, start, hidden)
        return hidden

    def _prompt_graph(self, token_ids: torch.Tensor, cache: StaticCache, width: int) -> torch.Tensor:
        """A pooled sequence's prompt through the captured prompt step of `width` positions
        (padded: padding rows write keys past the sequence's length, never read)."""
        step = self._prompt_step(width)
        n = token_ids.shape[0]
        step.tokens[:n].copy_(self._capture_graphs.to_device(token_ids))
        meta = self._capture_graphs.to_device(torch.tensor([cache.slot.index, cache.length], dtype=torch.long))
        step.slots.copy_(meta[:1])
        step.starts.copy_(meta[1:])
        step.run()
        cache.length += n
        return step.output[:n]  # the final hidden states, normed

    def _prompt_step(self, width: int) -> BatchStep:
        """The captured prompt step: one pooled sequence, `width` positions. The fused layers,
        with attention in PyTorch's kernel over the slot's cache under a causal mask."""
        step = self._prompt_steps.get((width, 1))
        if step is None:
            step = self._prompt_steps[(width, 1)] = self._step_shape(1, width, self._prompt_body)
        return step

    def _prompt_body(self, step: BatchStep) -> torch.Tensor:
        n, pool = step.width, self._leases.pool
        positions = step.starts + torch.arange(n, device=self.device)  # [n]
        hidden = self.embedding(step.tokens).float()
        rotary = self._rotary(positions.float())
        keys_at = self._key_positions[None]
        causal = keys_at <= positions[:, None]  # [n, capacity]
        masks: dict[int | None, torch.Tensor] = {}

        def attend(i, qkv, cos, sin, layer):
            gpu_kernels.write_kv_batch(qkv, cos, sin, pool.keys[i], pool.values[i], step.starts, step.slots, n,
                                       self._heads, self._kv_heads)
            window = layer.sliding_window
            if window not in masks:
                masks[window] = self._attention_heads.mask(
                    causal if window is None else causal & (keys_at > positions[:, None] - window))
            return self._attention_heads.prompt(qkv, cos, sin, pool.keys[i].index_select(0, step.slots)[0],
                                                pool.values[i].index_select(0, step.slots)[0], layer.scaling,
                                                masks[window])
        return self._fused.run(hidden, rotary, attend)

    def _fused_prompt(self, token_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """A prompt (more positions than a graph step takes), eagerly, over the fused layers:
        ~10 launches a layer. PyTorch's own layer is ~35 small ops, which on an 8B model
        made a 256-token prompt cost 35 ms of launches, and a server's batch waits for every
        new request's prompt. Attention runs in PyTorch's fused kernel over the live keys
        (the flash kernel for a prompt from position 0)."""
        n, start, slot = token_ids.shape[0], cache.length, cache.slot
        slot.start.fill_(start)
        positions = torch.arange(start, start + n, device=self.device, dtype=torch.float32)
        hidden = self.embedding(token_ids.to(self.device)).float()

        def attend(i, qkv, cos, sin, layer):
            gpu_kernels.write_kv(qkv, cos, sin, slot.keys[i], slot.values[i], slot.start, self._heads, self._kv_heads)
            causal = start == 0 and layer.sliding_window is None
            visible = None if causal else attention_mask(start, n, layer.sliding_window, self.device)
            return self._attention_heads.prompt(qkv, cos, sin, slot.keys[i][:, : start + n],
                                                slot.values[i][:, : start + n], layer.scaling,
                                                None if visible is None else self._attention_heads.mask(visible))

        hidden = self._fused.run(hidden, self._rotary(positions), attend)
        cache.length += n
        return hidden

    # ---- prompts that join a batch's pass --------------------------------------------------------
    def _pass_with_prompts(self, token_ids: list[torch.Tensor], caches: list[StaticCache], num_logits: list[int],
                           prompts: list[int], batch: list[int]) -> list[torch.Tensor]:
        """New sequences' prompts and a batch's narrow feeds in one captured pass, which reads
        the weights once for all their rows: a request joining a running batch then costs the
        others' step its prompt's rows, not a pass of its own before theirs (on an H100 an 8B
        prompt of 255 tokens took 10.7 ms alone beside a 6.9 ms step of seven sequences).

        Every feed is cut into pieces of JOIN_PIECE consecutive positions (its last one padded),
        and each piece runs as a sequence of the batched graphs' body: its rows write their keys,
        then attend over their own slot up to their own positions, so a prompt's later pieces see
        its earlier ones. One graph per count of pieces, in steps of JOIN_PIECES_STEP.
        Returns the logits of `prompts`, then of `batch`, each [num_logits_i, vocab]."""
        feeds = prompts + batch
        sizes = [token_ids[i].shape[0] for i in feeds]
        for i, n in zip(feeds, sizes):
            self._check_room(caches[i], count_pieces(n) * JOIN_PIECE)
        pieces, first_rows, slots, starts = join_layout(sizes, [caches[i] for i in feeds])
        keep = self._capture_graphs.run_step(self._join_step(pieces), [token_ids[i] for i in feeds], first_rows, slots,
                                             starts, [num_logits[i] for i in feeds], self._leases.pool.spare)
        for i, n in zip(feeds, sizes):
            caches[i].length += n
        logits = self._logits(self._join_step(pieces).output.index_select(0, keep))
        return list(logits.split([num_logits[i] for i in feeds]))

    def _join_step(self, pieces: int) -> BatchStep:
        """The captured pass over `pieces` pieces of JOIN_PIECE positions (see _pass_with_prompts);
        its output: the final hidden states, normed (logits are computed for the rows kept only)."""
        step = self._join_steps.get(pieces)
        if step is None:
            step = self._join_steps[pieces] = self._step_shape(pieces, JOIN_PIECE, self._batched_body)
        return step

    def _static_body(self, token_ids: torch.Tensor, slot: Slot) -> torch.Tensor:
        n = token_ids.shape[0]
        positions = slot.start + self._offsets[:n]  # [n], on the device
        hidden = self._static_inputs(token_ids, slot)
        angles = positions.float()
        rotary = self._rotary(angles)
        if self.kernels and n <= gpu_kernels.MAX_ROWS:
            def cache(i, qkv, cos, sin, layer):
                gpu_kernels.write_kv(qkv, cos, sin, slot.keys[i], slot.values[i], slot.start, self._heads,
                                     self._kv_heads)
                return gpu_kernels.attend(qkv, cos, sin, slot.keys[i], slot.values[i], slot.start, self._heads,
                                          layer.scaling, layer.sliding_window)
            return self._fused.run(hidden, rotary, cache)
        keys = self._key_positions[None]
        causal = keys <= positions[:, None]  # [n, capacity]
        masks: dict[int | None, torch.Tensor] = {}
        for i, layer in enumerate(self._layers):
            window = layer.sliding_window
            if window not in masks:
                visible = causal if window is None else causal & (keys > positions[:, None] - window)
                masks[window] = self._attention_heads.mask(visible)
            attend = self._attention_heads.over_slot(slot, positions, masks[window])
            hidden = self._layer(layer, i, hidden, rotary[layer.rope], attend)
        return F.rms_norm(hidden, (hidden.shape[-1],), self._final_norm, self._eps)

    def _static_inputs(self, token_ids: torch.Tensor, slot: Slot) -> torch.Tensor:
        """A step's first-layer rows: the token embeddings (a feature head's read its features too)."""
        return self.embedding(token_ids).float()

    def _product(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Up to MAX_ROWS rows: the skinny kernel, whose rows do not depend on how many come;
        a batch's larger passes: cuBLAS (compute starts to count there)."""
        if self.kernels and x.shape[0] <= gpu_kernels.MAX_ROWS:
            if isinstance(weight, Int8Weight):
                out = gpu_kernels.skinny_matmul_int8(x.to(self.dtype).contiguous(), weight.data, weight.scale)
                return out if bias is None else out + bias
            return gpu_kernels.skinny_matmul(x.contiguous(), weight, bias)
        out = linear(x, weight)
        return out if bias is None else out + bias

    def _kv_store(self, cache: StaticCache, length: int) -> Slot:
        self._check_room(cache, length - cache.length)
        return cache.slot

    def _check_room(self, cache: StaticCache, n: int) -> None:
        if cache.length + n > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} positions; "
                             f"{cache.length} + {n} do not fit")


def graph_decoder_for(model, capacity: int = DEFAULT_CAPACITY, kernels: bool | None = None):
    """The CUDA-graph path for a `transformers` model on a GPU, or the model unchanged where
    it does not apply (CPU, llama.cpp, an architecture the compact decoder lacks, subset heads)."""
    from .hf import HFCausalLM

    if not isinstance(model, HFCausalLM) or model.device.type != "cuda" or model.output_token_ids is not None:
        return model
    try:
        decoder = GraphDecoder(model.model, model.name, model.dtype, set(model.eos_token_ids), model.vocab_size,
                               capacity=capacity, kernels=kernels)
    except UnsupportedArchitecture:
        return model
    decoder.capture()
    return decoder
