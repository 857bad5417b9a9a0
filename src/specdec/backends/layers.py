"""The decoder layer's parts shared by the CPU (compact) and GPU (graph) decoders: its weights
as one record, weight-only int8, rotary angles, attention masks, and the product routing."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.cpu_matmul import FEW_ROWS, few_row_product, int8_product

# Up to this many rows an int8 product runs in an int8 kernel, whose cost grows with the row
# count; beyond, widening the weights once for a float32 GEMM is cheaper.
INT8_KERNEL_ROWS = 16


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Int8Weight:
    """Weight-only int8, one scale per output row: W ~ data * scale[:, None]. Activations stay
    in floating point, so unlike dynamic quantization no activation outlier is clipped."""

    data: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Weight":
        weight = weight.detach()
        data = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        # Float temporaries a block of rows at a time, not the whole head's.
        for block, block_data, block_scale in zip(weight.split(8192), data.split(8192), scale.split(8192)):
            block = block.float()
            block_scale.copy_((block.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny))
            block_data.copy_(torch.round(block / block_scale[:, None]).clamp_(-127, 127))
        return cls(data, scale)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def numel(self) -> int:
        return self.data.numel()

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] @ W.T, in x's dtype."""
        if x.shape[0] <= INT8_KERNEL_ROWS and x.device.type == "cpu":  # the GPU's is gpu_kernels'
            out = int8_product(x, self.data, self.scale)
            if out is None:  # no native kernel: PyTorch's (bfloat16 activations: its fast path)
                out = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.data, self.scale.to(torch.bfloat16))
            return out.to(x.dtype)
        return (x.float() @ (self.data.float() * self.scale[:, None]).T).to(x.dtype)


Weight = torch.Tensor | Int8Weight


@dataclass
class Layer:
    input_norm: torch.Tensor  # float32 weights with Gemma's (1 + w) folded in
    qkv: Weight  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Weight
    post_attention_norm: torch.Tensor | None  # Gemma: norm of the attention output
    pre_mlp_norm: torch.Tensor
    post_mlp_norm: torch.Tensor | None  # Gemma: norm of the MLP output
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight
    rope: int  # index into the decoder's rotary frequency tables
    sliding_window: int | None
    scaling: float


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the compact decoder cannot run this `transformers` model; None when it can."""
    config = model.config.get_text_config()
    family = getattr(config, "model_type", "")
    if family not in ("llama", "qwen2", "gemma3_text", "gemma3"):
        return f"no compact decoder for model type {family!r}"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping is not supported"
    return None


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    if isinstance(weight, Int8Weight):
        return weight.product(x)
    if x.device.type != "cpu":
        return x @ weight.T
    if x.shape[0] <= FEW_ROWS:
        return few_row_product(x, weight)
    # Prompts: CPU bfloat16 GEMMs run ~6x slower than float32 here (a 167-token prefill of
    # Gemma 3 270M took 1.85 s against 0.32 s), so widen the weights for the product.
    if weight.dtype == torch.bfloat16:
        return (x.float() @ weight.float().T).to(x.dtype)
    return x @ weight.T


def activation(config) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[getattr(config, "hidden_activation", None) or config.hidden_act]


def rotary_tables(rotary: nn.Module, config):
    """Inverse frequencies per rotary kind (Gemma 3: local and global), and which layer uses which."""
    layer_types = getattr(config, "layer_types", None)
    if hasattr(rotary, "inv_freq"):
        return [rotary.inv_freq.float()], [float(getattr(rotary, "attention_scaling", 1.0))], lambda i: 0
    kinds = sorted(set(layer_types))
    inv_freq = [getattr(rotary, f"{kind}_inv_freq").float() for kind in kinds]
    scales = [float(getattr(rotary, f"{kind}_attention_scaling", 1.0)) for kind in kinds]
    return inv_freq, scales, lambda i: kinds.index(layer_types[i])


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions[:, None] * inv_freq.to(positions.device)[None]  # [n, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [n, 1, d]: broadcast over heads
    return angles.cos() * scale, angles.sin() * scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(start: int, n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[n, start+n] boolean: query i (position start+i) sees key j when j <= start+i and, with
    a sliding window, j > start+i-window. None for a single query: the caller's slice of the
    cache already ends at it and starts at its window."""
    if n == 1:
        return None
    query = torch.arange(start, start + n, device=device)[:, None]
    key = torch.arange(start + n, device=device)[None]
    visible = key <= query
    if window is not None:
        visible &= key > query - window
    return visible
