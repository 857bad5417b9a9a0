"""The CPU path's decoder: a `transformers` model's own layers, without the framework around them.

It runs the default CPU target (one request, or a server's batch in one packed pass,
`forward_batch`) and the self-draft and distilled drafts. A step on CPU should cost what its
weights cost to read. Through `transformers` it costs about twice that: per token, Gemma 3
270M's 18 layers issue ~1,100 small ops (mask building, rotary tables, norms as five ops
each, a KV cache that grows by `torch.cat`), ~10 ms of overhead on a ~15 ms weight read. This
module runs the same computation with fused projections (q|k|v and gate|up as one matrix
each), one `rms_norm` call per norm, rotary angles computed once per step, and a
preallocated KV cache whose rewind is a length change.

Its numerics are close to `transformers`' but not bit-identical (the residual stream stays
float32, matmuls run in the weight dtype, a batch's products take other shapes): on the
default model its greedy tokens equal `transformers`' on the project's benchmark and the slow
tests, and the exactness tests hold it to the same path's plain decoding. Supported families:
Llama, Qwen2, Gemma 3 (text); others raise `UnsupportedArchitecture` and the caller keeps
`transformers` (a target) or its clone (a draft). The GPU path (graph_decoder.py) builds on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import CausalLM, CoversContext, SharesContext
from .features import ExposesFeatures, record_features
from .layers import (
    Int8Weight,
    Layer,
    UnsupportedArchitecture,
    Weight,
    activation,
    attention_mask,
    cos_sin,
    linear,
    rotary_tables,
    rotate,
    unsupported_reason,
)
from .native_step import one_row_step_for

INITIAL_CAPACITY = 512  # cached positions; doubled on demand
PREFILL_CHUNK = 1024
@dataclass(frozen=True)
class _Segment:
    positions: torch.Tensor  # [n] float32: the sequence's positions in this pass
    attend: Callable[..., torch.Tensor]  # (layer, index, q, k, v) -> [n, heads * head_dim]


class CompactCache:
    """Per-sequence keys and values, [kv_heads, capacity, head_dim] per layer; `length` is the truth."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.keys = [torch.empty(kv_heads, INITIAL_CAPACITY, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        self.length = 0
        # Head rows this sequence adds to a subset head: tokens of its own context that the
        # subset lacks (names, rare words of the prompt), so the draft can propose them too.
        self.extra_token_ids = torch.empty(0, dtype=torch.long)
        self.extra_head: torch.Tensor | None = None
        self.column_token_ids: torch.Tensor | None = None  # subset ids then extra ids, once per change
        self.covered = 0  # context tokens already checked
        self.feature_log = None  # a target's, for a feature drafter (backends/features.py)

    def reserve(self, length: int) -> None:
        capacity = self.keys[0].shape[1]
        if length <= capacity:
            return
        while capacity < length:
            capacity *= 2
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_empty(old.shape[0], capacity, old.shape[2])
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown


class CompactDecoder(CausalLM, SharesContext, CoversContext, ExposesFeatures):
    """`CausalLM` over a `transformers` decoder's weights (shared where dtypes match)."""

    prompts_join_batches = True  # its packed pass reads a joining prompt for less (base.reads_prompts_in_batches)

    def __init__(self, model: nn.Module, name: str, dtype: torch.dtype, eos_token_ids: set[int],
                 vocab_size: int, output_token_ids: torch.Tensor | None = None, int8_weights: bool = False) -> None:
        """dtype: the activations', the KV cache's and (unless int8_weights) the weights' dtype."""
        config = model.config.get_text_config()
        family = getattr(config, "model_type", "")
        unsupported = unsupported_reason(model)
        if unsupported:
            raise UnsupportedArchitecture(unsupported)
        self.name = name
        self.model = model  # the transformers module whose weights this runs (peers compare against it)
        self.vocab_size = vocab_size
        self.output_token_ids = output_token_ids
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = int(getattr(config, "max_position_embeddings", None) or 1 << 20)
        self.embedding = model.get_input_embeddings()  # the target's own module (Gemma scales rows)
        self.device = self.embedding.weight.device
        self.dtype = dtype
        self._int8_weights = int8_weights
        self._gemma = family.startswith("gemma")
        body = getattr(model, model.base_model_prefix)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self._heads, self._kv_heads = self._head_counts(config)
        self._eps = float(config.rms_norm_eps)
        self._act = activation(config)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._inv_freq, self._rope_scale, rope_index = rotary_tables(body.rotary_emb, config)
        self._layers = [self._convert_layer(layer, rope_index(i)) for i, layer in enumerate(body.layers)]
        self._final_norm = self._norm_weight(body.norm)
        self._one_row_step = one_row_step_for(self, getattr(config, "hidden_activation", None) or config.hidden_act)
        head = model.get_output_embeddings()
        if output_token_ids is not None and getattr(head, "bias", None) is not None:
            raise UnsupportedArchitecture("subset heads with a bias are not supported")
        self._full_head = head.weight  # the target's, shared: extra rows are gathered from it
        self.feature_size = int(config.hidden_size)
        self._head_bias = None if getattr(head, "bias", None) is None else head.bias.float()
        self._in_head = None
        if output_token_ids is None:
            self._head = self._weight(head.weight)
        else:
            self._set_subset_head(output_token_ids, head.weight[output_token_ids])

    def _set_subset_head(self, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """The head scores only `token_ids` (rows: their head rows); the rest have draft probability zero."""
        self.output_token_ids = token_ids
        self._head = self._weight(rows)
        self._in_head = torch.zeros(self.vocab_size, dtype=torch.bool)
        self._in_head[token_ids.cpu()] = True

    # ---- CausalLM ----------------------------------------------------------------------------
    def new_cache(self) -> CompactCache:
        return CompactCache(len(self._layers), self._kv_heads, self._head_dim, self.dtype, self.device)

    def cache_length(self, cache: CompactCache) -> int:
        return cache.length

    def rewind(self, cache: CompactCache, length: int) -> None:
        if length > cache.length:
            raise ValueError(f"cannot rewind a cache of {cache.length} positions to {length}")
        cache.length = length

    # ---- a self-draft's context from its target -------------------------------------------
    def renders_same_model(self, other: object) -> bool:
        """True when `other` runs this decoder's own transformers model (this is its self-draft,
        or its target): same layers, so the same cache layout and nearly the same keys and values."""
        return isinstance(other, CompactDecoder) and other is not self and other.model is self.model

    @torch.inference_mode()
    def adopt_context(self, cache: CompactCache, source: CompactCache, length: int) -> None:
        """Extend `cache` to `length` positions with the keys and values `source` holds there.
        A self-draft takes the prompt from its target this way instead of recomputing it: on
        CPU its int8 prefill of a 114-token prompt cost 6.3 s for Qwen2.5 1.5B (compute-bound
        products), the copy a few MB. The draft only proposes, so this cannot change outputs;
        its context is the target's exact one instead of its own approximation of it."""
        start = cache.length
        if length < start or length > source.length:
            raise ValueError(f"cannot adopt positions {start}..{length} from a cache of {source.length}")
        cache.reserve(length)
        for mine, theirs in ((cache.keys, source.keys), (cache.values, source.values)):
            for into, source_layer in zip(mine, theirs):
                into[:, start:length].copy_(source_layer[:, start:length])
        cache.length = length

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, cache: CompactCache) -> None:
        for start in range(0, token_ids.shape[0], PREFILL_CHUNK):
            self._body(token_ids[start : start + PREFILL_CHUNK], cache)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache: CompactCache, num_logits: int) -> torch.Tensor:
        if token_ids.shape[0] > PREFILL_CHUNK:  # a whole prompt: bound the attention scores' memory
            self.prefill(token_ids[:-num_logits], cache)
            token_ids = token_ids[-num_logits:]
        return self._logits(self._body(token_ids, cache)[-num_logits:], cache.extra_head)

    def _logits(self, hidden: torch.Tensor, extra_head: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden.to(self.dtype)
        logits = self._product(hidden, self._head).float()
        if extra_head is not None:
            logits = torch.cat([logits, linear(hidden, extra_head).float()], dim=-1)
        if self._head_bias is not None:
            logits = logits + self._head_bias
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _product(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        return linear(x, weight)  # the GPU path's own kernels replace this

    def flops_per_token(self) -> float:
        """~2 FLOPs per weight read for one position (the bench's compute estimate)."""
        weights = sum(m.numel() for layer in self._layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
        return 2.0 * (weights + self._head.numel())

    # ---- what a feature draft reads ---------------------------------------------------------
    @torch.inference_mode()
    def input_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(token_ids.to(self.device)).float()

    @torch.inference_mode()
    def head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._full_head[token_ids.to(self._full_head.device)].float()

    # ---- subset heads ---------------------------------------------------------------------
    def column_token_ids(self, cache: CompactCache) -> torch.Tensor | None:
        """The token id of each logits column for this sequence (None: the whole vocabulary)."""
        if self.output_token_ids is None:
            return None
        return self.output_token_ids if cache.column_token_ids is None else cache.column_token_ids

    def cover_context(self, cache: CompactCache, context: torch.Tensor) -> None:
        """Give this sequence's head a row for every context token the subset lacks."""
        if self._in_head is None or context.shape[0] <= cache.covered:
            return
        new = context[cache.covered :].cpu()
        cache.covered = context.shape[0]
        missing = new[~self._in_head[new]]
        if cache.extra_token_ids.numel():
            missing = missing[~torch.isin(missing, cache.extra_token_ids)]
        missing = torch.unique(missing)
        if not missing.numel():
            return
        rows = self.head_rows(missing).to(self.dtype)
        cache.extra_token_ids = torch.cat([cache.extra_token_ids, missing])
        cache.extra_head = rows if cache.extra_head is None else torch.cat([cache.extra_head, rows])
        cache.column_token_ids = torch.cat([self.output_token_ids, cache.extra_token_ids])

    # ---- batches -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_batch(self, token_ids: list[torch.Tensor], caches: list, num_logits: list[int]) -> list[torch.Tensor]:
        """Several sequences' new tokens in one pass: the projections run over all their rows
        at once (one read of the weights), attention runs per sequence over its own cache.
        Returns each sequence's logits [num_logits_i, columns]."""
        if len(token_ids) == 1:
            return [self.forward(token_ids[0], caches[0], num_logits[0])]
        if any(t.shape[0] > PREFILL_CHUNK for t in token_ids):
            return [self.forward(t, c, m) for t, c, m in zip(token_ids, caches, num_logits)]
        hidden = self._packed_body(token_ids, caches)  # [sum n_i, hidden]
        ends = list(accumulate(t.shape[0] for t in token_ids))
        rows = [hidden[end - m : end] for end, m in zip(ends, num_logits)]
        extra_heads = [c.extra_head for c in caches]
        if any(head is not None for head in extra_heads):  # per-sequence columns: one head each
            return [self._logits(h, head) for h, head in zip(rows, extra_heads)]
        return list(self._logits(torch.cat(rows)).split(num_logits))

    # ---- the decoder -------------------------------------------------------------------------
    def _body(self, token_ids: torch.Tensor, cache: CompactCache) -> torch.Tensor:
        if token_ids.shape[0] == 1 and self._one_row_step is not None:  # a draft step: native, all layers
            start = cache.length
            hidden = self._one_row_step(token_ids, cache)
            record_features(cache, start, hidden)
            return hidden
        return self._packed_body([token_ids], [cache])

    def _packed_body(self, token_ids: list[torch.Tensor], caches: list) -> torch.Tensor:
        """token_ids: each sequence's new tokens [n_i]; their rows are stacked in that order."""
        sizes = [t.shape[0] for t in token_ids]
        segments = [self._segment(cache, n) for cache, n in zip(caches, sizes)]
        # A sequence's first draft feed is its context, on the host; later ones are the device's own picks.
        hidden = self._input_rows(token_ids, caches)  # [sum n_i, hidden]
        positions = torch.cat([segment.positions for segment in segments])
        rotary = self._rotary(positions)

        def attend(layer: Layer, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            parts = zip(segments, q.split(sizes), k.split(sizes), v.split(sizes))
            return torch.cat([segment.attend(layer, index, *qkv) for segment, *qkv in parts])  # [sum n_i, heads * d]

        for i, layer in enumerate(self._layers):
            hidden = self._layer(layer, i, hidden, rotary[layer.rope], attend)
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self._final_norm, self._eps)
        for cache, rows in zip(caches, hidden.split(sizes)):
            record_features(cache, cache.length, rows)
            cache.length += rows.shape[0]
        return hidden

    def _input_rows(self, token_ids: list[torch.Tensor], caches: list) -> torch.Tensor:
        """The first layer's input rows: the token embeddings (a feature head reads others)."""
        return self.embedding(torch.cat([t.to(self.device) for t in token_ids])).float()

    def _rotary(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [n, 1, d] at float positions, per rotary table (Gemma's local and global layers differ)."""
        return [cos_sin(positions, inv_freq, scale) for inv_freq, scale in zip(self._inv_freq, self._rope_scale)]

    def _segment(self, cache: CompactCache, n: int) -> "_Segment":
        """One sequence's part of a pass: its positions, and attention over its own cache."""
        start = cache.length
        store = self._kv_store(cache, start + n)
        masks: dict[int | None, torch.Tensor | None] = {}

        def attend(layer: Layer, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            window = layer.sliding_window
            if window not in masks:
                masks[window] = attention_mask(start, n, window, self.device)
            out = self._attend(layer, q, k, v, store, index, start, masks[window])  # [heads, n, d]
            return out.transpose(0, 1).reshape(n, self._heads * self._head_dim)

        positions = torch.arange(start, start + n, device=self.device, dtype=torch.float32)
        return _Segment(positions, attend)

    def _kv_store(self, cache: CompactCache, length: int) -> CompactCache:
        """Where a pass writes keys and values (.keys, .values per layer), with room for `length` positions."""
        cache.reserve(length)
        return cache

    def _layer(self, layer: Layer, index: int, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
               attend) -> torch.Tensor:
        """hidden: [rows, hidden]; attend(layer, index, q, k, v) -> [rows, heads * head_dim]."""
        n, d = hidden.shape[0], self._head_dim
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.input_norm, self._eps).to(self.dtype)
        qkv = linear(x, layer.qkv)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qkv = qkv.float().view(n, self._heads + 2 * self._kv_heads, d)
        cos, sin = rotary
        if layer.q_norm is None:  # rotate queries and keys in one pass: half the small ops
            qk, v = qkv.split([self._heads + self._kv_heads, self._kv_heads], dim=1)
            q, k = rotate(qk, cos, sin).split([self._heads, self._kv_heads], dim=1)
        else:
            q, k, v = qkv.split([self._heads, self._kv_heads, self._kv_heads], dim=1)
            q = rotate(F.rms_norm(q, (d,), layer.q_norm, self._eps), cos, sin)
            k = rotate(F.rms_norm(k, (d,), layer.k_norm, self._eps), cos, sin)
        out = self._reduce(linear(attend(layer, index, q, k, v), layer.o).float())
        if layer.post_attention_norm is not None:
            out = F.rms_norm(out, (out.shape[-1],), layer.post_attention_norm, self._eps)
        hidden = hidden + out
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.pre_mlp_norm, self._eps).to(self.dtype)
        gate, up = linear(x, layer.gate_up).chunk(2, dim=-1)
        out = self._reduce(linear(self._act(gate) * up, layer.down).float())
        if layer.post_mlp_norm is not None:
            out = F.rms_norm(out, (out.shape[-1],), layer.post_mlp_norm, self._eps)
        return hidden + out

    def _head_counts(self, config) -> tuple[int, int]:
        """(query heads, key-value heads) this process computes: all of them (tensor_parallel.py: its share)."""
        return config.num_attention_heads, config.num_key_value_heads

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The attention and MLP outputs, whole (tensor_parallel.py sums its ranks' parts here)."""
        return partial

    def _attend(self, layer: Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: CompactCache,
                index: int, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Write this step's keys and values at positions start.. and attend over the cache."""
        n = q.shape[0]
        keys, values = cache.keys[index], cache.values[index]
        keys[:, start : start + n] = k.transpose(0, 1)
        values[:, start : start + n] = v.transpose(0, 1)
        first = 0 if layer.sliding_window is None else max(0, start - layer.sliding_window + 1)
        # A prompt from position 0 without a window is plainly causal: saying so lets the GPU
        # take its flash kernel (with a mask it fell back to float32 math: 8 of an 8B prefill's 37 ms).
        causal = mask is not None and start == 0 and layer.sliding_window is None
        return F.scaled_dot_product_attention(
            q.transpose(0, 1).to(self.dtype), keys[:, first : start + n], values[:, first : start + n],
            attn_mask=None if mask is None or causal else mask[:, first:], is_causal=causal, scale=layer.scaling,
            enable_gqa=True,
        )

    # ---- weights -----------------------------------------------------------------------------
    def _convert_layer(self, layer: nn.Module, rope: int) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_bias = None
        if attn.q_proj.bias is not None:
            qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).to(self.dtype)
        gemma_style = hasattr(layer, "pre_feedforward_layernorm")
        return Layer(
            input_norm=self._norm_weight(layer.input_layernorm),
            qkv=self._weight(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
            qkv_bias=qkv_bias,
            q_norm=self._norm_weight(attn.q_norm) if getattr(attn, "q_norm", None) is not None else None,
            k_norm=self._norm_weight(attn.k_norm) if getattr(attn, "k_norm", None) is not None else None,
            o=self._weight(attn.o_proj.weight),
            post_attention_norm=self._norm_weight(layer.post_attention_layernorm) if gemma_style else None,
            pre_mlp_norm=self._norm_weight(layer.pre_feedforward_layernorm if gemma_style
                                           else layer.post_attention_layernorm),
            post_mlp_norm=self._norm_weight(layer.post_feedforward_layernorm) if gemma_style else None,
            gate_up=self._weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
            down=self._weight(mlp.down_proj.weight),
            rope=rope,
            sliding_window=getattr(attn, "sliding_window", None) or None,
            scaling=float(attn.scaling),
        )

    def _weight(self, weight: torch.Tensor) -> Weight:
        """A matrix as this decoder multiplies it: in its dtype (shared where it already is), or int8."""
        return Int8Weight.quantize(weight) if self._int8_weights else weight.to(self.dtype)

    def _norm_weight(self, norm: nn.Module) -> torch.Tensor:
        weight = norm.weight.detach().float()
        return 1.0 + weight if self._gemma else weight  # Gemma scales by (1 + w)


def compact_target_for(model):
    """The target on the compact decoder, for a `transformers` model on CPU: one packed pass
    verifies a whole batch of requests (forward_batch). The model unchanged where that does
    not apply (GPU: graph_decoder_for; llama.cpp; other architectures; subset heads)."""
    from .hf import HFCausalLM

    if not isinstance(model, HFCausalLM) or model.device.type != "cpu" or model.output_token_ids is not None:
        return model
    try:
        return CompactDecoder(model.model, model.name, model.dtype, set(model.eos_token_ids), model.vocab_size)
    except UnsupportedArchitecture:
        return model
