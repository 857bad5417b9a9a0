"""Attention of the GPU path's PyTorch steps (prompts; steps without the fused kernels) in
PyTorch's fused kernels, whose only shape is four-dimensional."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import Layer, rotate
from .static_cache import Slot


@dataclass(frozen=True)
class GroupedAttention:
    """Grouped-query attention under a mask as one fused kernel: the query heads that share a
    key/value head are stacked as extra query rows of it, so neither the keys and values are
    copied out to every query head nor the kernel falls back to float32 math."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def mask(self, visible: torch.Tensor) -> torch.Tensor:
        """[n, keys] visibility -> an additive mask for the grouped queries, row g * n + i for
        query head g of a group at step position i."""
        group = self.heads // self.kv_heads
        additive = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        additive.masked_fill_(~visible, float("-inf"))
        return additive.repeat(group, 1)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
               mask: torch.Tensor) -> torch.Tensor:
        """Queries [n, heads, d] over keys and values [kv_heads, positions, d] under `mask`
        (from .mask) -> [heads, n, d]."""
        n, kv, d = q.shape[0], self.kv_heads, self.head_dim
        group = self.heads // kv
        grouped = q.to(self.dtype).view(n, kv, group, d).permute(1, 2, 0, 3).reshape(kv, group * n, d)
        out = F.scaled_dot_product_attention(grouped[None], keys[None], values[None], attn_mask=mask,
                                             scale=scaling)  # 4-D: the fused kernels' only shape
        return out.reshape(self.heads, n, d)  # head j * group + g: as transformers repeats them

    def over_slot(self, slot: Slot, positions: torch.Tensor, mask: torch.Tensor):
        """attend(layer, index, q, k, v) -> [n, heads * head_dim] for one sequence's rows: its
        keys and values written at `positions` [n] of the slot, then attended over the slot's
        whole capacity under the mask (a fixed shape, and a few hundred MB of reads at most
        against the weights' GBs)."""
        def attend(layer: Layer, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = slot.keys[index], slot.values[index]
            keys.index_copy_(1, positions, k.transpose(0, 1).to(self.dtype))
            values.index_copy_(1, positions, v.transpose(0, 1).to(self.dtype))
            out = self.attend(q, keys, values, layer.scaling, mask)  # [heads, n, d]
            return out.transpose(0, 1).reshape(q.shape[0], self.heads * self.head_dim)
        return attend

    def prompt(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """A prompt's queries (rotated here) over keys and values already in the cache
        -> [n, heads * d]. mask: from .mask, or None for a causal prompt over exactly its own
        keys, which takes the flash kernel (grouped heads and all). Under a mask, stacked rows:
        the fall-back kernel runs in float32 (a 255-token 8B prompt spent 7 of its 18 ms there;
        10.6 ms in all since)."""
        n, d = qkv.shape[0], self.head_dim
        q = rotate(qkv[:, : self.heads * d].float().view(n, self.heads, d), cos, sin).to(self.dtype)
        if mask is None:
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], is_causal=True,
                                                 scale=scaling, enable_gqa=True)[0]
        else:
            out = self.attend(q, keys, values, scaling, mask)
        return out.transpose(0, 1).reshape(n, self.heads * d)
