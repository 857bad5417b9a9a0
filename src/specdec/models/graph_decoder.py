"""The GPU path: a static KV cache and CUDA graphs of the decode, draft and verify steps.

At batch 1 a GPU decode step should cost one read of the weights (an 8B model in bf16:
16 GB at ~3.35 TB/s on an H100, ~4.8 ms). An eager Python loop instead spends most of the
step launching a few hundred small kernels. Each step here has a fixed shape (1 token for a
decode or draft step, k+1 for a verify), so each shape is captured once as a CUDA graph over
a cache of fixed capacity, and replayed: positions travel as a device tensor, a rewind is a
change of the length, and nothing in a step waits for the host.

A cache is a lease of a slot; a slot keeps its buffers and graphs when its lease ends, so
the next request reuses them instead of capturing again.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import gpu_kernels
from .base import pinned
from .compact_decoder import CompactDecoder, _cos_sin, _Layer, _linear

GRAPH_MAX_TOKENS = 16  # steps feeding more tokens than this (prompts) run eagerly
DEFAULT_CAPACITY = 4096  # positions per sequence; the model's max_context is capped to it


class _Slot:
    """One sequence's keys and values at fixed addresses, and the graphs that write them."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.keys = [torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.start = torch.zeros((), dtype=torch.long, device=device)  # first position of a step
        self.inputs: dict[int, torch.Tensor] = {}  # tokens per step size, [n]
        self.outputs: dict[int, torch.Tensor] = {}  # logits per step size, [n, vocab]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Plain greedy decoding (GreedyChain): a one-token step that ends by writing its
        # argmax into its own input, so the next step needs nothing from the host.
        self.chain_input = torch.zeros(1, dtype=torch.long, device=device)
        self.chain_graph: torch.cuda.CUDAGraph | None = None


class StaticCache:
    """A sequence's lease of a slot; `length` is the truth, positions past it are stale."""

    def __init__(self, slot: _Slot, release) -> None:
        self.slot = slot
        self.length = 0
        self.extra_head = None  # no per-sequence head rows on this path
        weakref.finalize(self, release, slot)


class GraphDecoder(CompactDecoder):
    """CompactDecoder with a static cache and, on CUDA, one captured graph per step size."""

    def __init__(self, model: nn.Module, name: str, dtype: torch.dtype, eos_token_ids: set[int],
                 vocab_size: int, capacity: int = DEFAULT_CAPACITY, kernels: bool | None = None) -> None:
        """kernels: run steps of up to gpu_kernels.MAX_ROWS positions through the Triton kernels of
        gpu_kernels (None: wherever they apply on CUDA, unless SPECDEC_GPU_KERNELS=0; True off
        CUDA runs them in Triton's interpreter, for tests)."""
        super().__init__(model, name, dtype, eos_token_ids, vocab_size)
        self.capacity = min(capacity, self.max_context)
        self.max_context = self.capacity
        self._free: list[_Slot] = []
        # Off CUDA every step runs eagerly over the same static cache (that is how CPU tests
        # check this path's arithmetic); graphs run one at a time, so they share one pool.
        self._graphs = self.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self._graphs else None
        self._offsets = torch.arange(GRAPH_MAX_TOKENS, device=self.device)
        self._key_positions = torch.arange(self.capacity, device=self.device)
        reason = self._kernels_do_not_apply(model)
        if kernels and reason:
            raise ValueError(f"the fused GPU kernels do not apply: {reason}")
        if kernels is None:  # SPECDEC_GPU_KERNELS=0 turns them off where a caller cannot say so
            kernels = self.device.type == "cuda" and reason is None and os.environ.get("SPECDEC_GPU_KERNELS") != "0"
        self.kernels = kernels

    def _kernels_do_not_apply(self, model: nn.Module) -> str | None:
        config = model.config.get_text_config()
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        if not gpu_kernels.available():
            return "Triton is not installed"
        if self.dtype not in gpu_kernels.DTYPES:
            return f"{self.dtype} weights"
        if act != "silu":
            return f"the {getattr(config, 'model_type', '?')} layer (the kernels fuse Llama-style layers)"
        if any(layer.q_norm is not None or layer.post_attention_norm is not None for layer in self._layers):
            return "query/key or post-attention norms (the kernels fuse Llama-style layers)"
        if self._head_dim & (self._head_dim - 1) or self._head_dim < 16:
            return f"head size {self._head_dim} (a power of two from 16 is needed)"
        if any(not isinstance(w, torch.Tensor) for layer in self._layers for w in (layer.qkv, layer.o, layer.gate_up)):
            return "quantised weights"
        return None

    # ---- CausalLM ----------------------------------------------------------------------------
    def new_cache(self) -> StaticCache:
        slot = self._free.pop() if self._free else _Slot(
            len(self._layers), self._kv_heads, self.capacity, self._head_dim, self.dtype, self.device)
        return StaticCache(slot, self._free.append)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache: StaticCache, num_logits: int) -> torch.Tensor:
        """Logits [num_logits, vocab]. From a graph they live in the slot's output buffer,
        valid until this decoder's next graph step on any cache: the graphs share one memory
        pool, so a later replay may reuse the buffer (copy logits that must outlive it)."""
        n = token_ids.shape[0]
        self._check_room(cache, n)
        if n > GRAPH_MAX_TOKENS or not self._graphs:
            return super().forward(token_ids, cache, num_logits)
        slot = cache.slot
        slot.start.fill_(cache.length)
        if n not in slot.graphs:
            self._capture(slot, n)
        slot.inputs[n].copy_(pinned(token_ids), non_blocking=True)
        slot.graphs[n].replay()
        cache.length += n
        return slot.outputs[n][n - num_logits :]

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, cache: StaticCache) -> None:
        self._check_room(cache, token_ids.shape[0])
        super().prefill(token_ids, cache)

    def cover_context(self, cache: StaticCache, context: torch.Tensor) -> None:
        return None  # the full head already covers every token

    @torch.inference_mode()
    def greedy_chain(self, cache: StaticCache, last_token: int) -> "GreedyChain":
        """Plain greedy decoding after `last_token` (the one token not yet in the cache),
        with the device kept a step ahead of the host."""
        slot = cache.slot
        if self._graphs and slot.chain_graph is None:
            slot.start.fill_(cache.length)  # the capture's warm-up runs write past the length
            self._capture_chain(slot)  # before the input is set: warm-up runs overwrite it
        slot.chain_input.fill_(last_token)
        return GreedyChain(self, cache)

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

    def _chain_body(self, slot: _Slot) -> None:
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

    def _capture(self, slot: _Slot, n: int) -> None:
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        slot.inputs[n] = tokens
        outputs: list[torch.Tensor] = []
        slot.graphs[n] = self._captured(lambda: outputs.append(self._logits(self._static_body(tokens, slot))))
        slot.outputs[n] = outputs[-1]

    def _capture_chain(self, slot: _Slot) -> None:
        slot.chain_graph = self._captured(lambda: self._chain_body(slot))

    def _captured(self, step) -> torch.cuda.CUDAGraph:
        # Warm-up runs (on a side stream, as capture requires) write stale keys at positions
        # from slot.start on: past the sequence's length, where nothing reads them.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        return graph

    # ---- the decoder over a static cache ----------------------------------------------------------
    def _body(self, token_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """Eager steps (prompts; every step off CUDA) of up to MAX_ROWS positions take the
        graphs' path; longer ones attend over the live part of the cache only, as the compact
        decoder does (a masked attention over the whole capacity costs a prompt dearly)."""
        if token_ids.shape[0] > GRAPH_MAX_TOKENS:
            return self._packed_body([token_ids], [cache])
        cache.slot.start.fill_(cache.length)
        hidden = self._static_body(token_ids.to(self.device), cache.slot)
        cache.length += token_ids.shape[0]
        return hidden

    def _static_body(self, token_ids: torch.Tensor, slot: _Slot) -> torch.Tensor:
        n = token_ids.shape[0]
        positions = slot.start + self._offsets[:n]  # [n], on the device
        hidden = self.embedding(token_ids).float()
        angles = positions.float()
        rotary = [_cos_sin(angles, inv_freq, scale) for inv_freq, scale in zip(self._inv_freq, self._rope_scale)]
        if self.kernels and n <= gpu_kernels.MAX_ROWS:
            return self._fused_layers(hidden, rotary, slot)
        keys = self._key_positions[None]
        causal = keys <= positions[:, None]  # [n, capacity]
        masks: dict[int | None, torch.Tensor] = {}
        for i, layer in enumerate(self._layers):
            window = layer.sliding_window
            if window not in masks:
                visible = causal if window is None else causal & (keys > positions[:, None] - window)
                masks[window] = self._grouped_mask(visible)
            hidden = self._layer(layer, i, hidden, rotary[layer.rope], self._attention(slot, positions, masks[window]))
        return F.rms_norm(hidden, (hidden.shape[-1],), self._final_norm, self._eps)

    def _fused_layers(self, hidden: torch.Tensor, rotary: list[tuple[torch.Tensor, torch.Tensor]],
                      slot: _Slot) -> torch.Tensor:
        """The same layers as _static_body in 9 kernels each (gpu_kernels); the final hidden
        state comes out normed, in the weights' dtype."""
        delta = None  # the last MLP's output, added to the residual stream by the next norm
        for i, layer in enumerate(self._layers):
            cos, sin = rotary[layer.rope]
            x = gpu_kernels.add_rms_norm(hidden, delta, layer.input_norm, self._eps, self.dtype)
            qkv = gpu_kernels.skinny_matmul(x, layer.qkv, layer.qkv_bias)
            keys, values = slot.keys[i], slot.values[i]
            gpu_kernels.write_kv(qkv, cos, sin, keys, values, slot.start, self._heads, self._kv_heads)
            attended = gpu_kernels.attend(qkv, cos, sin, keys, values, slot.start, self._heads, layer.scaling,
                                          layer.sliding_window)
            x = gpu_kernels.add_rms_norm(hidden, gpu_kernels.skinny_matmul(attended, layer.o), layer.pre_mlp_norm,
                                         self._eps, self.dtype)
            gated = gpu_kernels.silu_mul(gpu_kernels.skinny_matmul(x, layer.gate_up))
            delta = gpu_kernels.skinny_matmul(gated, layer.down)
        return gpu_kernels.add_rms_norm(hidden, delta, self._final_norm, self._eps, self.dtype)

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kernels and x.shape[0] <= gpu_kernels.MAX_ROWS:
            return gpu_kernels.skinny_matmul(x.contiguous(), weight)
        return _linear(x, weight)

    def _attention(self, slot: _Slot, positions: torch.Tensor, mask: torch.Tensor):
        """attend(layer, index, q, k, v) -> [n, heads * head_dim] for one sequence's rows."""
        def attend(layer: _Layer, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = self._attend_static(layer, q, k, v, slot, index, positions, mask)  # [heads, n, d]
            return out.transpose(0, 1).reshape(q.shape[0], self._heads * self._head_dim)
        return attend

    def _kv_store(self, cache: StaticCache, length: int) -> _Slot:
        self._check_room(cache, length - cache.length)
        return cache.slot

    def _grouped_mask(self, visible: torch.Tensor) -> torch.Tensor:
        """[n, capacity] visibility -> an additive mask for the grouped queries of _attend_static,
        row g * n + i for query head g of a group at step position i."""
        group = self._heads // self._kv_heads
        additive = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        additive.masked_fill_(~visible, float("-inf"))
        return additive.repeat(group, 1)

    def _attend_static(self, layer: _Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: _Slot,
                index: int, start: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """start: this step's positions [n]. Attends over the whole capacity under the mask:
        a fixed shape, and a few hundred MB of reads at most against the weights' GBs.

        The query heads that share a key/value head are stacked as extra query rows of it, so
        attention is one fused kernel; grouped-query attention with a mask would otherwise
        copy the keys and values out to every query head first."""
        keys, values = cache.keys[index], cache.values[index]
        keys.index_copy_(1, start, k.transpose(0, 1).to(self.dtype))
        values.index_copy_(1, start, v.transpose(0, 1).to(self.dtype))
        n, kv, d = q.shape[0], self._kv_heads, self._head_dim
        group = self._heads // kv
        grouped = q.to(self.dtype).view(n, kv, group, d).permute(1, 2, 0, 3).reshape(kv, group * n, d)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=layer.scaling)
        return out.reshape(self._heads, n, d)  # head j * group + g: as transformers repeats them

    def _check_room(self, cache: StaticCache, n: int) -> None:
        if cache.length + n > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} positions; "
                             f"{cache.length} + {n} do not fit")


class GreedyChain:
    """Plain greedy decoding with the host one step behind the device.

    A plain step's host work (reading the token, emitting its text, the next launch) took
    ~0.2 ms per token on an H100, 3 % of an 8B step, with the GPU idle. Here each step ends by
    writing its argmax into its own input, so the next step is launched before the host has
    read the token; the host reads each token through pinned memory while the next step runs.
    The cache then holds the newest token too: whoever stops the chain rewinds it (a step
    launched ahead of an EOS is discarded, never emitted).
    """

    def __init__(self, decoder: GraphDecoder, cache: StaticCache) -> None:
        """Use GraphDecoder.greedy_chain, which sets the first input."""
        self.decoder, self.cache = decoder, cache
        self._async = decoder._graphs
        # host copies of launched steps' tokens, oldest first, with the event that marks each ready
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._spare: list[torch.Tensor] = []

    @torch.inference_mode()
    def launch(self) -> None:
        """Queue one more step after the newest token."""
        self.decoder._chain_step(self.cache)
        chosen = self.cache.slot.chain_input
        if not self._async:
            self._pending.append((chosen.clone(), None))
            return
        host = self._spare.pop() if self._spare else torch.empty(1, dtype=torch.long, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event))

    @property
    def queued(self) -> int:
        return len(self._pending)

    def take(self) -> int:
        """The oldest queued step's token (waits for that step only)."""
        host, event = self._pending.pop(0)
        if event is not None:
            event.synchronize()
            self._spare.append(host)
        return int(host[0])


def graph_decoder_for(model, capacity: int = DEFAULT_CAPACITY, kernels: bool | None = None):
    """The CUDA-graph path for a `transformers` model on a GPU, or the model unchanged where
    it does not apply (CPU, llama.cpp, an architecture the compact decoder lacks, subset heads)."""
    from .compact_decoder import UnsupportedArchitecture
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
