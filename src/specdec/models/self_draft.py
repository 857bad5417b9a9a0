"""A draft built from the target itself: the same network with cheaper linear layers.

The clone shares everything but the linear layers with the target (embedding table, norms,
rotary buffers: no copies); each nn.Linear, the output head included, becomes an int8
dynamically quantized linear (per-output-channel scales), or a bfloat16 copy. On CPU, where
decoding reads every weight once per token, that cuts the bytes read per draft step by ~4x
(int8) or 2x (bf16). Output stays lossless: the full-precision target verifies every token.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings

import torch
from torch import nn

from .cpu_matmul import FewRowLinear
from .hf import HFCausalLM

log = logging.getLogger("specdec")

SCHEMES = ("int8", "bfloat16")


def build_self_draft(target: HFCausalLM, scheme: str = "int8") -> HFCausalLM:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown self-draft scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme == "int8" and (target.device.type != "cpu" or target.dtype != torch.float32):
        raise ValueError("int8 self-drafts use CPU float32 kernels (fbgemm); elsewhere use the bfloat16 scheme")
    started = time.perf_counter()
    convert = _int8_linear if scheme == "int8" else _bf16_linear
    clone = _clone_with(target.model, convert)
    log.info("built %s self-draft of %s in %.1f s", scheme, target.name, time.perf_counter() - started)
    return HFCausalLM(clone, f"{target.name} [self-draft {scheme}]", eos_token_ids=set(target.eos_token_ids))


def _clone_with(module: nn.Module, convert) -> nn.Module:
    """Shallow-copy the module tree (own child dicts, shared tensors), converting linears."""
    if isinstance(module, nn.Linear):
        return convert(module)
    clone = copy.copy(module)
    clone._modules = {name: _clone_with(child, convert) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


def _int8_linear(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    float_linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    float_linear.weight, float_linear.bias = linear.weight, linear.bias  # no copy; quantized below
    float_linear.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return DynamicQuantizedLinear.from_float(float_linear)


def _bf16_linear(linear: nn.Linear) -> nn.Module:
    half = FewRowLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device, dtype=torch.bfloat16)
    with torch.no_grad():
        half.weight.copy_(linear.weight)
        if linear.bias is not None:
            half.bias.copy_(linear.bias)
    return _CastLinear(half)


class _CastLinear(nn.Module):
    """Runs a bfloat16 linear inside a float32 network."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.inner.weight.dtype)).to(x.dtype)
