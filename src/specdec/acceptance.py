"""Decide which drafted tokens the target keeps, and what it emits after them.

Words follow vLLM: a drafted token is *accepted* or rejected; at the first rejection the
target emits a *recovered* token; when every draft is accepted it emits a *bonus* token
from its distribution after the last draft. Either way each verify pass emits
`num_accepted + 1` tokens, all of them vouched for by the target.

Greedy: accept while the draft equals the target's argmax (exact by construction).
Sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft token x with probability
min(1, p(x) / q(x)); on rejection sample from norm(max(0, p - q)). The output then has
exactly the target distribution p. A model-free draft has q = one-hot(x).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .logits import sample


@dataclass(frozen=True)
class Verdict:
    num_accepted: int  # length of the accepted draft prefix, 0..k
    next_token: int  # recovered token (a draft was rejected) or bonus token (all accepted)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> Verdict:
    """target_logits: [k+1, vocab] at the positions of [last, d1..dk]; draft_tokens: [k], on
    the target's device or on the host (then the target's k+1 picks are read over, once)."""
    target_tokens = target_logits.argmax(dim=-1)  # [k+1]
    if draft_tokens.device != target_tokens.device:
        target_tokens = target_tokens.to(draft_tokens.device)
    accepted = (draft_tokens == target_tokens[:-1]).to(torch.int32).cumprod(dim=0).sum()
    num_accepted, next_token = torch.stack([accepted.long(), target_tokens[accepted]]).tolist()  # one host read
    return Verdict(num_accepted, next_token)


def verify_greedy_batch(target_logits: list[torch.Tensor], draft_tokens: list[torch.Tensor]) -> list[Verdict]:
    """verify_greedy for the sequences of one shared verify pass, with one read from the
    device instead of one per sequence (each read waits on the device, and the GPU idles
    until the batch's next launch). target_logits: each sequence's [k_i+1, vocab], on one
    device; draft_tokens: its [k_i], there or on the host."""
    # Each sequence's argmax, then one small cat: a cat of the logits themselves would copy
    # them (32 rows of Gemma's 262k-token vocabulary: 33 MB a step on CPU).
    picks = torch.cat([rows.argmax(dim=-1) for rows in target_logits])  # [R], R = sum(k_i + 1)
    total = picks.shape[0]
    # Drafts made on the device come back in the same read as the picks.
    on_device = [i for i, t in enumerate(draft_tokens) if t.device.type != "cpu"]
    read = torch.cat([picks, *(draft_tokens[i].to(picks.device) for i in on_device)]).cpu()
    picks, drafts = read[:total], list(draft_tokens)
    for i, tokens in zip(on_device, read[total:].split([draft_tokens[i].shape[0] for i in on_device])):
        drafts[i] = tokens
    # Padded to [B, K]; sequence b's picks are rows starts[b] .. starts[b] + k_b.
    sizes = torch.tensor([t.shape[0] for t in drafts], dtype=torch.long)
    starts = torch.cumsum(sizes + 1, 0) - (sizes + 1)
    width = int(sizes.max())
    columns = torch.arange(width)
    valid = columns < sizes[:, None]  # [B, K]
    padded = torch.full((len(drafts), width), -1, dtype=torch.long)  # -1: no token, never a pick
    padded[valid] = torch.cat(drafts).long()
    their_picks = picks[(starts[:, None] + columns).clamp(max=total - 1)]  # [B, K]
    accepted = (padded == their_picks).to(torch.int32).cumprod(dim=1).sum(dim=1)  # [B]
    next_tokens = picks[starts + accepted]
    return [Verdict(n, t) for n, t in zip(accepted.tolist(), next_tokens.tolist())]


def verify_sampled(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Verdict:
    """Rejection sampling over all k positions at once.

    target_probs: [k+1, vocab]; draft_tokens: [k]; draft_probs: [k, vocab] or None for a
    model-free (one-hot) draft. All probabilities already shaped by the same
    temperature / top-k / top-p.
    """
    k = draft_tokens.shape[0]
    positions = torch.arange(k, device=target_probs.device)
    target_p = target_probs[positions, draft_tokens]  # [k]
    draft_q = draft_probs[positions, draft_tokens] if draft_probs is not None else None  # [k]
    uniform = torch.rand(k, generator=generator, device=target_probs.device)  # [k]
    accepted = uniform < acceptance_probability(target_p, draft_q)  # [k]
    num_accepted = _accepted_prefix_length(accepted)
    if num_accepted == k:
        next_dist = target_probs[k]  # bonus
    else:
        row_q = draft_probs[num_accepted] if draft_probs is not None else None
        next_dist = recovered_distribution(target_probs[num_accepted], row_q, draft_tokens[num_accepted])
    return Verdict(num_accepted, int(sample(next_dist.unsqueeze(0), generator)[0]))


def acceptance_probability(target_p: torch.Tensor, draft_q: torch.Tensor | None) -> torch.Tensor:
    """min(1, p(x)/q(x)) for drafted tokens x. [k] -> [k]. draft_q None means q(x) = 1."""
    if draft_q is None:
        return target_p.clamp(max=1.0)
    return (target_p / draft_q.clamp_min(torch.finfo(draft_q.dtype).tiny)).clamp(max=1.0)


def recovered_distribution(
    target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_token: torch.Tensor
) -> torch.Tensor:
    """norm(max(0, p - q)) over [vocab]. With draft_probs None, q = one-hot(draft_token)."""
    if draft_probs is None:
        residual = target_probs.clone()
        residual[draft_token] = 0.0
    else:
        residual = (target_probs - draft_probs).clamp_min(0.0)
    total = residual.sum()
    # A rejection only happens where p(x) < q(x), so the residual has mass; the guard covers
    # float round-off on distributions that are equal to within rounding.
    if total <= 0:
        return target_probs
    return residual / total


def _accepted_prefix_length(accepted: torch.Tensor) -> int:
    """[k] bool -> number of leading Trues."""
    return int(accepted.to(torch.int32).cumprod(dim=0).sum())


def reference_verify_sampled(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Verdict:
    """Slow, obviously-correct loop over positions. For tests only."""
    k = draft_tokens.shape[0]
    for i in range(k):
        x = int(draft_tokens[i])
        p = float(target_probs[i, x])
        q = float(draft_probs[i, x]) if draft_probs is not None else 1.0
        if float(torch.rand(1, generator=generator)) < min(1.0, p / q):
            continue
        q_row = draft_probs[i] if draft_probs is not None else torch.nn.functional.one_hot(
            torch.tensor(x), target_probs.shape[-1]
        ).to(target_probs.dtype)
        residual = torch.clamp(target_probs[i] - q_row, min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else target_probs[i]
        return Verdict(i, int(torch.multinomial(residual, 1, generator=generator)))
    return Verdict(k, int(torch.multinomial(target_probs[k], 1, generator=generator)))
