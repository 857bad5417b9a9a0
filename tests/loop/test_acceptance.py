"""The acceptance rule, checked against its closed form and against a slow reference."""
from __future__ import annotations

import pytest
import torch

from specdec.acceptance import (acceptance_probability, recovered_distribution, reference_verify_sampled,
                                verify_greedy, verify_greedy_batch, verify_sampled)
from stats_util import chi2_critical, chi2_statistic


def random_dist(v: int, generator: torch.Generator, sparsity: float = 0.0) -> torch.Tensor:
    logits = torch.randn(v, generator=generator, dtype=torch.float64) * 2
    if sparsity:
        logits[torch.rand(v, generator=generator) < sparsity] = float("-inf")
        logits[0] = 0.0  # keep at least one token
    return torch.softmax(logits, -1)


def one_step_output_distribution(target: torch.Tensor, draft: torch.Tensor | None) -> torch.Tensor:
    """Exact P(first emitted token = x) for one draft position, from the rule's own pieces:
    sum over drafted y of q(y) [accept(y) 1{x=y} + (1 - accept(y)) residual_y(x)]."""
    v = target.shape[0]
    out = torch.zeros(v, dtype=torch.float64)
    draft_dist = draft if draft is not None else None
    for y in range(v):
        q_y = float(draft_dist[y]) if draft_dist is not None else 1.0
        if q_y == 0:
            continue
        acc = float(acceptance_probability(target[y : y + 1], None if draft is None else draft[y : y + 1])[0])
        out[y] += q_y * acc
        out += q_y * (1 - acc) * recovered_distribution(target, draft, torch.tensor(y))
        if draft is None:
            break  # a one-hot draft proposes only y (here token 0)
    return out


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_one_step_output_distribution_equals_target_exactly(seed, sparsity):
    g = torch.Generator().manual_seed(seed)
    target = random_dist(12, g, sparsity)
    draft = random_dist(12, g, sparsity / 2)
    assert torch.allclose(one_step_output_distribution(target, draft), target, atol=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_one_hot_draft_output_distribution_equals_target_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    target = random_dist(12, g)
    # the drafter proposed token 0 deterministically: q = one-hot(0)
    assert torch.allclose(one_step_output_distribution(target, None), target, atol=1e-12)


def test_closed_form_check_would_catch_a_wrong_residual():
    """Power check: replacing the residual by the target itself breaks the identity."""
    g = torch.Generator().manual_seed(0)
    target, draft = random_dist(12, g), random_dist(12, g)
    wrong = sum(draft[y] * (min(1.0, float(target[y] / draft[y])) * torch.nn.functional.one_hot(
        torch.tensor(y), 12).double() + (1 - min(1.0, float(target[y] / draft[y]))) * target) for y in range(12))
    assert not torch.allclose(wrong, target, atol=1e-3)


def test_greedy_accepts_longest_agreeing_prefix_and_takes_target_token_next():
    logits = torch.full((5, 10), -5.0)
    for pos, tok in enumerate([3, 4, 7, 1, 9]):
        logits[pos, tok] = 5.0
    assert verify_greedy(logits, torch.tensor([3, 4, 2, 1])) .__dict__ == {"num_accepted": 2, "next_token": 7}
    assert verify_greedy(logits, torch.tensor([3, 4, 7, 1])).__dict__ == {"num_accepted": 4, "next_token": 9}
    assert verify_greedy(logits, torch.tensor([0, 4, 7, 1])).__dict__ == {"num_accepted": 0, "next_token": 3}
    assert verify_greedy(logits[:1], torch.tensor([], dtype=torch.long)).__dict__ == {"num_accepted": 0, "next_token": 3}


def test_batched_greedy_verdicts_equal_each_sequence_verified_alone():
    """A batch's verdicts, read at once, are each sequence's own: random ragged batches
    (k from 0 to 6, drafts agreeing for a random prefix, then by chance)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        batch = int(torch.randint(1, 9, (1,), generator=g))
        logits, drafts = [], []
        for _ in range(batch):
            k = int(torch.randint(0, 7, (1,), generator=g))
            rows = torch.randn(k + 1, 11, generator=g)
            agree = int(torch.randint(0, k + 1, (1,), generator=g))
            tokens = rows.argmax(-1)[:k].clone()
            tokens[agree:] = torch.randint(0, 11, (k - agree,), generator=g)
            logits.append(rows)
            drafts.append(tokens)
        expected = [verify_greedy(rows, tokens) for rows, tokens in zip(logits, drafts)]
        assert verify_greedy_batch(logits, drafts) == expected


@pytest.mark.heavy
@pytest.mark.parametrize("one_hot", [False, True])
def test_vectorized_sampler_matches_reference_in_distribution(one_hot):
    """Joint law of (num_accepted, next_token) from the fast sampler vs the per-token reference."""
    k, v, n = 3, 6, 20000
    g = torch.Generator().manual_seed(1)
    target = torch.stack([random_dist(v, g) for _ in range(k + 1)]).float()
    draft = torch.stack([random_dist(v, g) for _ in range(k)]).float()
    draft_tokens = torch.tensor([1, 2, 3])
    draft_probs = None if one_hot else draft

    def histogram(fn, seed):
        gen = torch.Generator().manual_seed(seed)
        counts = torch.zeros((k + 1) * v)
        for _ in range(n):
            verdict = fn(target, draft_tokens, draft_probs, gen)
            counts[verdict.num_accepted * v + verdict.next_token] += 1
        return counts

    fast, slow = histogram(verify_sampled, 2), histogram(reference_verify_sampled, 3)
    # two-sample chi-square on the pooled table
    pooled = (fast + slow) / (2 * n)
    stat_fast, df = chi2_statistic(fast, pooled)
    stat_slow, _ = chi2_statistic(slow, pooled)
    assert stat_fast + stat_slow < chi2_critical(df, 1e-4)


def test_rejected_token_is_never_recovered_with_one_hot_draft():
    target = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    gen = torch.Generator().manual_seed(0)
    rejected = 0
    for _ in range(200):
        verdict = verify_sampled(target, torch.tensor([0]), None, gen)
        if verdict.num_accepted == 0:
            rejected += 1
            assert verdict.next_token == 1  # token 0 was rejected, token 2 has no mass
    assert 60 <= rejected <= 140  # rejected with probability 1 - p(0) = 0.5
