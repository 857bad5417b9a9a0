"""A draft built from the target itself: the same network, cheaper to run.

On CPU, decoding reads every weight once per token, so a draft is cheap when it reads few
bytes. The clone shares the target's embedding table (no copy) and changes two things:
  precision  bfloat16 (every weight but the embedding; half the bytes, and Gemma-style
             norms still compute in float32) or int8 (a quarter of the bytes). On CPU the
             int8 draft is weight-only, one scale per output row, with float32 activations
             (compact_decoder.Int8Weight); where the compact decoder does not apply it falls
             back to dynamic quantization of a transformers clone, whose int8 activations
             lose acceptance on models with activation outliers;
  vocabulary an output head over only the `draft_vocab` most frequent tokens, which for
             large-vocabulary models is most of the saving (Gemma 3 270M: the 262k x 640 head
             is 60 % of the weights). See token_frequency.py.
Output stays lossless: the full-precision target verifies every token.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings

import torch
from torch import nn

from ..backends.compact_decoder import CompactDecoder, UnsupportedArchitecture, unsupported_reason
from ..backends.hf import HFCausalLM
from ..errors import SpecDecError
from ..kernels.cpu_matmul import FewRowLinear

log = logging.getLogger("specdec")

SCHEMES = ("auto", "bfloat16", "int8")
DEFAULT_DRAFT_VOCAB = 32768  # covers ~95 % of Gemma 3's greedy picks on English text and code


def build_self_draft(
    target: HFCausalLM,
    scheme: str = "auto",
    draft_vocab: int | None = None,
    token_ranking: torch.Tensor | None = None,
) -> HFCausalLM | CompactDecoder:
    """Clone `target` at `scheme` precision; with `draft_vocab`, keep the head's top-ranked rows only.

    On CPU the draft runs on the compact decoder (compact_decoder.py), which also gives each
    sequence head rows for its own context tokens; elsewhere it is a `transformers` clone.

    token_ranking: every token id, most useful first (token_frequency.frequent_tokens);
    needed when draft_vocab is smaller than the vocabulary.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown self-draft scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    scheme = resolve_scheme(target, scheme)
    if scheme == "int8" and (target.device.type != "cpu" or target.dtype != torch.float32):
        raise ValueError("int8 self-drafts use CPU float32 kernels (fbgemm); elsewhere use the bfloat16 scheme")
    if draft_vocab is not None and draft_vocab >= target.vocab_size:
        draft_vocab = None  # the whole vocabulary: nothing to cut
    if draft_vocab is not None:
        if draft_vocab < 1:
            raise ValueError(f"draft_vocab must be a positive number of tokens, got {draft_vocab}")
        if token_ranking is None or token_ranking.shape[0] < draft_vocab:
            raise ValueError("a reduced draft vocabulary needs a token ranking covering at least draft_vocab ids")
    started = time.perf_counter()
    draft = None
    if target.device.type == "cpu":
        try:
            # int8 weights multiply float32 activations in the native kernel: no casts per product.
            dtype = torch.float32 if scheme == "int8" else torch.bfloat16
            draft = CompactDecoder(target.model, _draft_name(target.name, scheme, draft_vocab), dtype,
                                   set(target.eos_token_ids), target.vocab_size,
                                   _subset(token_ranking, draft_vocab), int8_weights=scheme == "int8")
        except UnsupportedArchitecture as exc:
            log.info("%s; the self-draft runs through transformers instead", exc)
    if draft is None:
        draft = _clone_self_draft(target, scheme, draft_vocab, token_ranking)
    log.info("built %s in %.1f s", draft.name, time.perf_counter() - started)
    return draft


def resolve_scheme(target: HFCausalLM, scheme: str) -> str:
    """"auto": int8 where it runs weight-only on the compact decoder (a CPU float32 target of a
    supported family: a quarter of the target's bytes, ~10 % of its step on the default model),
    bfloat16 elsewhere."""
    if scheme != "auto":
        return scheme
    compact = target.device.type == "cpu" and unsupported_reason(target.model) is None
    return "int8" if compact and target.dtype == torch.float32 else "bfloat16"


def _clone_self_draft(target: HFCausalLM, scheme: str, draft_vocab: int | None,
                      token_ranking: torch.Tensor | None) -> HFCausalLM:
    """The `transformers` module tree of the target, cloned with cheaper weights."""
    embedding = target.model.get_input_embeddings()
    if scheme == "int8":
        clone = _clone(target.model, lambda m: _int8_linear(m) if isinstance(m, nn.Linear) else None)
    else:
        clone = _clone(target.model, lambda m: _bf16_embedding(m) if m is embedding else None,
                       parameter_dtype=torch.bfloat16)
    output_token_ids = _subset(token_ranking, draft_vocab)
    if output_token_ids is not None:
        clone.set_output_embeddings(_head_subset(target.model.get_output_embeddings(), output_token_ids, scheme))
    return HFCausalLM(clone, _draft_name(target.name, scheme, draft_vocab), eos_token_ids=set(target.eos_token_ids),
                      output_token_ids=output_token_ids, vocab_size=target.vocab_size)


def _subset(token_ranking: torch.Tensor | None, draft_vocab: int | None) -> torch.Tensor | None:
    return None if draft_vocab is None else token_ranking[:draft_vocab].clone()


def _draft_name(target_name: str, scheme: str, draft_vocab: int | None) -> str:
    vocab = f", top {draft_vocab} tokens" if draft_vocab else ""
    return f"self-draft of {target_name} ({scheme}{vocab})"


def _clone(module: nn.Module, replace, parameter_dtype: torch.dtype | None = None) -> nn.Module:
    """Shallow-copy the module tree: each module gets its own child and parameter dicts, so
    the target is untouched; `replace(m)` may substitute a whole submodule; with
    `parameter_dtype`, floating parameters are cast (shared when already of that dtype).
    Buffers (rotary frequencies, scales) are shared as they are: models compute them in
    float32 on purpose."""
    substitute = replace(module)
    if substitute is not None:
        return substitute
    clone = copy.copy(module)
    if parameter_dtype is not None:
        clone._parameters = {
            name: _cast_parameter(p, parameter_dtype) for name, p in module._parameters.items()
        }
    clone._modules = {name: _clone(child, replace, parameter_dtype) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


def _cast_parameter(parameter: nn.Parameter | None, dtype: torch.dtype) -> nn.Parameter | None:
    if parameter is None or not parameter.is_floating_point() or parameter.dtype == dtype:
        return parameter
    return nn.Parameter(parameter.detach().to(dtype), requires_grad=False)


class _CastEmbedding(nn.Module):
    """The target's own embedding (shared, not copied), handing rows on in the draft's dtype."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.cast_to = inner, dtype

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids).to(self.cast_to)


def _bf16_embedding(embedding: nn.Module) -> nn.Module:
    return _CastEmbedding(embedding, torch.bfloat16)


def _head_subset(head: nn.Module, token_ids: torch.Tensor, scheme: str) -> nn.Module:
    weight = head.weight[token_ids.to(head.weight.device)]
    bias = head.bias[token_ids] if getattr(head, "bias", None) is not None else None
    dtype = torch.bfloat16 if scheme == "bfloat16" else weight.dtype
    subset = FewRowLinear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        subset.weight.copy_(weight)
        if bias is not None:
            subset.bias.copy_(bias)
    subset.requires_grad_(False)
    return _int8_linear(subset) if scheme == "int8" else subset


def _int8_linear(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    float_linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    float_linear.weight, float_linear.bias = linear.weight, linear.bias  # no copy; quantized below
    float_linear.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return DynamicQuantizedLinear.from_float(float_linear)


def self_draft_for(target: HFCausalLM, tokenizer, scheme: str = "auto",
                   draft_vocab: int | None = DEFAULT_DRAFT_VOCAB) -> HFCausalLM | CompactDecoder:
    """The self-draft as the engine builds it: the vocabulary cut by corpus frequency when the
    target has a tokenizer to rank tokens with, the whole vocabulary otherwise."""
    if not isinstance(target, HFCausalLM) and isinstance(getattr(target, "model", None), nn.Module):
        target = HFCausalLM(target.model, target.name)  # the GPU path keeps its transformers module
    if not isinstance(target, HFCausalLM):
        raise SpecDecError("the self-draft is built from a torch (transformers) target")
    if draft_vocab is None or draft_vocab >= target.vocab_size:
        return build_self_draft(target, scheme)
    if tokenizer is None:
        log.info("no tokenizer to rank tokens with: the self-draft keeps the whole vocabulary")
        return build_self_draft(target, scheme)
    from .token_frequency import frequent_tokens

    return build_self_draft(target, scheme, draft_vocab, frequent_tokens(tokenizer, target.vocab_size))
