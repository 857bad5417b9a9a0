"""Turn raw logits into the distribution a request samples from (temperature, top-k, top-p).

The same function shapes the target's and the draft's distributions, as rejection
sampling requires both to be the distributions actually sampled from.
"""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] logits -> [n, vocab] float32 probabilities after temperature/top-k/top-p."""
    # The gaps to the row's maximum are divided, not the raw logits: a tiny temperature
    # (1e-40) then gives the argmax (0 for the top token, -inf below it), not inf - inf = nan.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return probs


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the smallest set of most likely tokens whose mass reaches top_p; the top token always stays.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[n, vocab] -> [n] token ids, one draw per row."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
