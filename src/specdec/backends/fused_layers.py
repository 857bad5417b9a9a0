"""The GPU path's layers as the Triton kernels run them (kernels/gpu_kernels.py): ~9 kernels a
layer where PyTorch's own layer is ~35 small ops, and where they apply."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..kernels import gpu_kernels
from .layers import Int8Weight, Layer

Product = Callable[..., torch.Tensor]  # (x, weight, bias=None) -> x @ weight.T (+ bias)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Layer], torch.Tensor]


def why_kernels_do_not_apply(model: nn.Module, layers: list[Layer], dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused kernels cannot run this model's layers; None when they can."""
    config = model.config.get_text_config()
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if not gpu_kernels.available():
        return "Triton is not installed"
    if dtype not in gpu_kernels.DTYPES:
        return f"{dtype} weights"
    if act != "silu":
        return f"the {getattr(config, 'model_type', '?')} layer (the kernels fuse Llama-style layers)"
    if any(layer.q_norm is not None or layer.post_attention_norm is not None for layer in layers):
        return "query/key or post-attention norms (the kernels fuse Llama-style layers)"
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head size {head_dim} (a power of two from 16 is needed)"
    if any(not isinstance(w, (torch.Tensor, Int8Weight)) for layer in layers for w in (layer.qkv, layer.o, layer.gate_up)):
        return "quantised weights of a kind the kernels do not read"
    return None


@dataclass(frozen=True)
class FusedLayers:
    """The decoder's layers in the fused kernels; the final hidden state comes out normed, in
    the weights' dtype."""

    layers: list[Layer]
    final_norm: torch.Tensor
    eps: float
    dtype: torch.dtype
    product: Product  # the decoder's: the skinny kernel for few rows, cuBLAS beyond
    # The attention and MLP outputs made whole: the identity, or a tensor-parallel all-reduce
    # (tensor_parallel.py) of this rank's part
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda partial: partial  # noqa: E731

    def run(self, hidden: torch.Tensor, rotary: list[tuple[torch.Tensor, torch.Tensor]],
            attend: Attend) -> torch.Tensor:
        """hidden: [n, width] float32 embeddings. attend(index, qkv, cos, sin, layer) writes a
        layer's keys and values and returns its attention output."""
        delta = None  # the last MLP's output, added to the residual stream by the next norm
        for i, layer in enumerate(self.layers):
            cos, sin = rotary[layer.rope]
            x = gpu_kernels.add_rms_norm(hidden, delta, layer.input_norm, self.eps, self.dtype)
            attended = attend(i, self.product(x, layer.qkv, layer.qkv_bias), cos, sin, layer)
            x = gpu_kernels.add_rms_norm(hidden, self.reduce(self.product(attended, layer.o)), layer.pre_mlp_norm,
                                         self.eps, self.dtype)
            gated = gpu_kernels.silu_mul(self.product(x, layer.gate_up))
            delta = self.reduce(self.product(gated, layer.down))
        return gpu_kernels.add_rms_norm(hidden, delta, self.final_norm, self.eps, self.dtype)
