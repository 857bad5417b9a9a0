"""A target split over processes (tensor parallelism): each rank holds a slice of every layer.

Megatron's split of a decoder block: the query, key and value projections and the MLP's gate and
up projections are column-parallel (rank r keeps heads r·H/W.. and intermediate units r·I/W..,
and its slice of the KV cache); the attention output and the MLP's down projection are
row-parallel (rank r multiplies its slice of their inputs), so one all-reduce after each sums
the ranks' parts into the whole output. Norms, embedding and head are replicated. Every rank
runs the same loop on the same tokens (SPMD): after the all-reduces every rank holds the same
logits, so a deterministic drafter (or a replicated draft model, or sampling with the request's
seed) reaches the same verdict everywhere, and rank 0 answers. The one choice that follows
timings, the draft length, is rank 0's (`agreed_draft_lengths`).

`TensorParallelDecoder` splits the CPU decoder, `TensorParallelGraphDecoder` the GPU path (its
fused kernels take the all-reduce too). On CPU the group is gloo (the tests: two processes give
one process's outputs); on GPUs, NCCL. Only float weights are split (the int8 native step is a
one-process path).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .compact_decoder import CompactDecoder
from .graph_decoder import GraphDecoder
from .layers import Layer, UnsupportedArchitecture


class SplitLayers:
    """What splits a compact decoder (or the GPU path's graph decoder) over a process group;
    mixed in before it. Call the constructor on every rank of `group` (default: the world)."""

    def __init__(self, model: nn.Module, *args, group: dist.ProcessGroup | None = None, **kwargs) -> None:
        self._group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._full = split_sizes(model.config.get_text_config(), self.world_size)
        super().__init__(model, *args, **kwargs)
        self._one_row_step = None  # the native step runs whole layers

    def agreed_draft_lengths(self, ks: list[int]) -> list[int]:
        """Rank 0's: each rank's adaptive k follows its own timings, and ranks that drafted
        different lengths would run different passes."""
        agreed = torch.tensor(ks, dtype=torch.long, device=self.device)
        dist.broadcast(agreed, src=dist.get_global_rank(self._group, 0) if self._group else 0, group=self._group)
        return agreed.tolist()

    def _head_counts(self, config) -> tuple[int, int]:
        heads, kv_heads, _ = self._full
        return heads // self.world_size, kv_heads // self.world_size

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, group=self._group)
        return partial

    def _convert_layer(self, layer: nn.Module, rope: int) -> Layer:
        whole = super()._convert_layer(layer, rope)
        heads, kv_heads, intermediate = self._full
        d, r, w = self._head_dim, self.rank, self.world_size
        q_rows, kv_rows, units = heads // w * d, kv_heads // w * d, intermediate // w
        # Rows of [q; k; v] for this rank's heads, and of [gate; up] for its units.
        qkv_index = torch.cat([torch.arange(r * q_rows, (r + 1) * q_rows),
                               heads * d + torch.arange(r * kv_rows, (r + 1) * kv_rows),
                               (heads + kv_heads) * d + torch.arange(r * kv_rows, (r + 1) * kv_rows)])
        unit_index = torch.cat([torch.arange(r * units, (r + 1) * units),
                                intermediate + torch.arange(r * units, (r + 1) * units)])
        whole.qkv = _rows(whole.qkv, qkv_index)
        if whole.qkv_bias is not None:
            whole.qkv_bias = whole.qkv_bias[qkv_index.to(whole.qkv_bias.device)].contiguous()
        whole.o = _columns(whole.o, r * q_rows, (r + 1) * q_rows)
        whole.gate_up = _rows(whole.gate_up, unit_index)
        whole.down = _columns(whole.down, r * units, (r + 1) * units)
        return whole


class TensorParallelDecoder(SplitLayers, CompactDecoder):
    """The CPU decoder split over a process group (gloo)."""


class TensorParallelGraphDecoder(SplitLayers, GraphDecoder):
    """The GPU path split over a process group: on CUDA with NCCL, each step's all-reduces are
    captured in its graph with the rest; on CPU (gloo) its steps run eagerly, as in the tests."""


def split_sizes(config, world_size: int) -> tuple[int, int, int]:
    """(heads, key-value heads, MLP units) of a model whose layers split evenly over `world_size` ranks."""
    heads, kv_heads, intermediate = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if heads % world_size or kv_heads % world_size or intermediate % world_size:
        raise UnsupportedArchitecture(f"{heads} heads, {kv_heads} key-value heads and {intermediate} MLP units do "
                                      f"not split over {world_size} ranks")
    return heads, kv_heads, intermediate


def _rows(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedArchitecture("tensor parallelism splits float weights only")
    return weight[index.to(weight.device)].contiguous()


def _columns(weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedArchitecture("tensor parallelism splits float weights only")
    return weight[:, start:end].contiguous()
