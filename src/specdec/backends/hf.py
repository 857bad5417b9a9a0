"""`transformers` backend: any Hugging Face causal LM, CPU or GPU."""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from ..kernels.cpu_matmul import set_few_row_matmul
from .base import CausalLM

# Long prompts are written into the cache in chunks to bound activation memory.
PREFILL_CHUNK = 2048


class HFCausalLM(CausalLM):
    """Wraps a `transformers` causal LM behind the `CausalLM` interface."""

    def __init__(
        self,
        model: PreTrainedModel,
        name: str,
        eos_token_ids: set[int] | None = None,
        output_token_ids: torch.Tensor | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """output_token_ids: for a head over a subset of the vocabulary, the token id of each
        logits column (then `vocab_size`, the full vocabulary, must be given too)."""
        self.model = model.eval()
        self.name = name
        text_config = model.config.get_text_config()
        self._config = text_config
        head = model.get_output_embeddings()
        head_size = int(getattr(head, "out_features", None) or head.weight.shape[0])
        if output_token_ids is not None and (vocab_size is None or output_token_ids.shape[0] != head_size):
            raise ValueError("a subset head needs one token id per logits column and the full vocabulary size")
        self.vocab_size = int(vocab_size or head_size)
        self.output_token_ids = output_token_ids
        self.max_context = int(getattr(text_config, "max_position_embeddings", None) or 1 << 20)
        embedding = model.get_input_embeddings().weight  # a float tensor even in quantized clones
        self.device, self.dtype = embedding.device, embedding.dtype
        self.eos_token_ids = frozenset(_eos_ids(model) if eos_token_ids is None else eos_token_ids)
        # The decoder body without the output head: prefill needs no logits, and the head is
        # the costliest layer of small large-vocabulary models (Gemma 3: 262k x 640).
        self._body = getattr(model, model.base_model_prefix, None)
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns,
        # and goes in 5.40): pass the cache by the name this version takes.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if self.device.type == "cpu":
            set_few_row_matmul(model, True)

    def new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self._config)
        # Sliding-window layers keep only the window unless told to record the past, and
        # then cannot be cropped once the window is full; speculative decoding must crop.
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()
        return cache

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, cache: DynamicCache) -> None:
        for start in range(0, token_ids.shape[0], PREFILL_CHUNK):
            chunk = token_ids[start : start + PREFILL_CHUNK].to(self.device)[None]
            if self._body is not None:
                self._body(input_ids=chunk, use_cache=True, **{self._cache_arg: cache})
            else:
                self.model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
            cache.crop(0)  # let sliding layers drop what falls out of the window

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache: DynamicCache, num_logits: int) -> torch.Tensor:
        out = self.model(input_ids=token_ids.to(self.device)[None], use_cache=True, logits_to_keep=num_logits,
                         **{self._cache_arg: cache})
        return out.logits[0, -num_logits:].float()  # [num_logits, vocab]

    def flops_per_token(self) -> float:
        """~2 FLOPs per weight of every linear layer (the output head included, even when tied
        to the input embedding, which is a lookup); quantized linears count by their shapes.
        Attention-score FLOPs are left out: small at these lengths."""
        from torch import nn
        from torch.ao.nn.quantized import Linear as QuantizedLinear

        return 2.0 * sum(m.in_features * m.out_features for m in self.model.modules()
                         if isinstance(m, (nn.Linear, QuantizedLinear)))

    def cache_length(self, cache: DynamicCache) -> int:
        return int(cache.get_seq_length())

    def rewind(self, cache: DynamicCache, length: int) -> None:
        excess = self.cache_length(cache) - length
        if excess < 0:
            raise ValueError(f"cannot rewind a cache of {length + excess} positions to {length}")
        cache.crop(-excess)


def _eos_ids(model: PreTrainedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
