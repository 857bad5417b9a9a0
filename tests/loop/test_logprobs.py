"""Log probabilities under speculation are plain decoding's: each emitted token's, read from the
verify pass's row for its position, equals the target's own log-softmax at that position.

Tolerance: float64 tiny models, where a verify pass and a one-token pass agree to ~1e-15; the
reference is `transformers`' own forward over the whole output, independent of our loop."""
from __future__ import annotations

import pytest
import torch

from exactness import PROMPTS
from specdec import Engine, InvalidRequestError, SamplingParams


def reference_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[n, vocab] the target's log-softmax for each output token's position."""
    with torch.no_grad():
        logits = model.model(torch.tensor([prompt + output])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(output)].double(), dim=-1)


@pytest.mark.parametrize("k", [1, 3, None])
@pytest.mark.parametrize("drafter", ["ngram", "self", "random"])
def test_greedy_logprobs_under_speculation_are_the_targets(target_llama, self_draft_llama, random_draft_llama,
                                                           drafter, k):
    engine = {"ngram": Engine(target_llama, drafter="ngram"),
              "self": Engine(target_llama, drafter="model", draft_model=self_draft_llama),
              "random": Engine(target_llama, drafter="model", draft_model=random_draft_llama)}[drafter]
    drafted = 0
    for prompt in PROMPTS[:4]:
        out = engine.generate(prompt, max_new_tokens=24, num_draft_tokens=k, logprobs=3)
        drafted += out.stats.drafted_tokens
        plain = engine.generate(prompt, max_new_tokens=24, num_draft_tokens=0, logprobs=3)
        assert out.token_ids == plain.token_ids
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
        reference = reference_logprobs(target_llama, prompt, out.token_ids)
        for i, (lp, lp_plain) in enumerate(zip(out.logprobs, plain.logprobs)):
            assert lp.logprob == pytest.approx(float(reference[i, lp.token_id]), abs=1e-6)
            assert lp.logprob == pytest.approx(lp_plain.logprob, abs=1e-9)
            assert [t for t, _ in lp.top] == reference[i].topk(3).indices.tolist()
            assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
    assert drafted > 0  # the logprobs above came through verify passes of drafts, for every drafter


def test_sampled_logprobs_are_the_targets_own_for_the_sampled_tokens(target_llama, random_draft_llama):
    engine = Engine(target_llama, drafter="model", draft_model=random_draft_llama)
    prompt = PROMPTS[0]
    out = engine.generate(prompt, max_new_tokens=20, temperature=1.0, seed=3, num_draft_tokens=3, logprobs=0)
    assert out.stats.drafted_tokens > 0 and len(out.logprobs) == len(out.token_ids)
    reference = reference_logprobs(target_llama, prompt, out.token_ids)
    for i, lp in enumerate(out.logprobs):
        assert lp.top == ()
        assert lp.logprob == pytest.approx(float(reference[i, lp.token_id]), abs=1e-6)


def test_no_logprobs_unless_asked_and_bad_counts_refused(target_llama):
    assert Engine(target_llama).generate(PROMPTS[0], max_new_tokens=4).logprobs is None
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(InvalidRequestError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_logprobs_in_a_batch_equal_each_request_alone(target_llama, self_draft_llama):
    engine = Engine(target_llama, drafter="model", draft_model=self_draft_llama)
    params = SamplingParams(max_new_tokens=16, num_draft_tokens=3, logprobs=2)
    running = [engine.start(p, params) for p in PROMPTS[:4]]
    generations = list(running)
    while running:
        engine.batch_stepper.step(running)
        running = [g for g in running if not g.finished]
    for prompt, generation in zip(PROMPTS[:4], generations):
        alone = engine.start(prompt, params).run()
        batched = generation.output()
        assert batched.token_ids == alone.token_ids
        assert [[t for t, _ in lp.top] for lp in batched.logprobs] == [[t for t, _ in lp.top] for lp in alone.logprobs]
        assert [lp.logprob for lp in batched.logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs], abs=1e-9)
