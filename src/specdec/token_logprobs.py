"""Log probabilities of the emitted tokens, read from the target's verify logits.

Row j of a verify pass over [last, d1..dk] is the target's distribution for the token after
position j: the row plain decoding computes one step at a time. So a speculative generation
reports, for each token it emits, what plain decoding reports for it (to float rounding
between the two pass shapes; exact on the float64 test models). Log probabilities are of the
model's own distribution, before temperature, top-k and top-p (as vLLM reports by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and their log probabilities, best first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """logits: [>= n, vocab] rows whose next tokens are token_ids [n]; top: alternatives per token."""
    n = len(token_ids)
    logprobs = torch.log_softmax(logits[:n].float(), dim=-1)  # [n, vocab]
    chosen = logprobs[torch.arange(n, device=logprobs.device), torch.tensor(token_ids, device=logprobs.device)]
    tops: list[tuple[tuple[int, float], ...]] = [()] * n
    if top:
        values, indices = logprobs.topk(top, dim=-1)  # [n, top]
        tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(token_ids, chosen.tolist(), tops)]
