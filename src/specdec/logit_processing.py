"""Penalties and logit biases, applied at every verified position as plain decoding applies them.

A verify pass's row j scores the token after the drafts d_1..d_j, so the tokens counted at row j
are the output so far plus those drafts, exactly the output plain decoding would have had there.
The counts of every row come from one cumulative sum over the drafts; only the tokens that
occur (the output's and the drafts') are touched, never a vocabulary-wide count table.
OpenAI's semantics: logit_bias is added to the logits; presence_penalty is subtracted once for
each token that occurs in the output, frequency_penalty once per occurrence. The prompt does not
count (as in OpenAI's API and vLLM).
"""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def adjusts_logits(params: SamplingParams) -> bool:
    return bool(params.logit_bias) or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, output: torch.Tensor,
                    drafts: torch.Tensor) -> torch.Tensor:
    """logits [k+1, vocab] of a verify pass over [last, d_1..d_k]; output [n] the tokens generated
    before it; drafts [k] (k may exceed the rows - 1: only the first rows - 1 count). A new tensor."""
    rows = logits.shape[0]
    out = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=out.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=out.dtype, device=out.device)
        out[:, ids] += bias
    if params.presence_penalty == 0.0 and params.frequency_penalty == 0.0:
        return out
    history = torch.cat([output.to(out.device), drafts[: rows - 1].to(out.device)])
    if history.numel() == 0:
        return out
    tokens, column = torch.unique(history, return_inverse=True)
    onehot = torch.zeros(history.shape[0], tokens.shape[0], dtype=out.dtype, device=out.device)
    onehot[torch.arange(history.shape[0], device=out.device), column] = 1.0
    n = output.shape[0]
    # row j counts the output and drafts d_1..d_j
    drafted = torch.cumsum(onehot[n:], dim=0)
    counts = onehot[:n].sum(dim=0) + torch.cat([torch.zeros_like(onehot[:1]), drafted])[:rows]
    out[:, tokens] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out.dtype)
    return out
