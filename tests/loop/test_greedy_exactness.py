"""Greedy speculative decoding emits exactly the target's own greedy tokens.

Tolerance: these tiny models run in float64, where verifying k+1 positions in one pass and
decoding them one by one differ by ~1e-15 in the logits, far below the top-2 logit margins
(>1e-3 on these models), so we require exact token equality. The reference is
`transformers`' own `generate()`, independent of our loop.
"""
from __future__ import annotations

import pytest
import torch

from specdec import Engine
from exactness import PROMPTS, reference_greedy, run

KS = [1, 2, 4, 8, None]  # None: adaptive


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("drafter", ["ngram", "self", "random"])
def test_greedy_output_equals_target_greedy(target_llama, self_draft_llama, random_draft_llama, drafter, k):
    target = target_llama
    engine = {
        "ngram": Engine(target, drafter="ngram"),
        "self": Engine(target, drafter="model", draft_model=self_draft_llama),
        "random": Engine(target, drafter="model", draft_model=random_draft_llama),
    }[drafter]
    for prompt in PROMPTS:
        expected = reference_greedy(target, prompt, 40)
        assert run(engine, prompt, 40, k).token_ids == expected, f"prompt {prompt}"


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_target_as_its_own_draft_accepts_everything(target_llama, self_draft_llama, k):
    engine = Engine(target_llama, drafter="model", draft_model=self_draft_llama)
    out = run(engine, PROMPTS[0], 10 * (k + 1), k)
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.mean_accepted_length == k + 1
    assert out.stats.per_position_acceptance == [1.0] * k
    assert out.provenance.count("target") == out.stats.target_forward_passes


def test_random_draft_is_rejected_but_output_is_exact(target_llama, random_draft_llama):
    engine = Engine(target_llama, drafter="model", draft_model=random_draft_llama)
    out = run(engine, PROMPTS[0], 60, 4)
    assert out.stats.acceptance_rate < 0.15
    assert out.token_ids == reference_greedy(target_llama, PROMPTS[0], 60)


@pytest.mark.parametrize("k", [2, 5, None])
@pytest.mark.parametrize("drafter", ["ngram", "self"])
def test_sliding_window_model_stays_exact_past_the_window(target_gemma, drafter, k):
    """Gemma 3 layout (sliding + global layers), window 8: rewinds cross the window edge."""
    import tiny

    draft = tiny.wrap(tiny.gemma3(seed=0), "tiny-gemma3-self")
    engine = Engine(target_gemma, drafter="model", draft_model=draft) if drafter == "self" else Engine(target_gemma)
    for prompt in PROMPTS[:3]:
        assert run(engine, prompt, 50, k).token_ids == reference_greedy(target_gemma, prompt, 50)


def test_plain_decoding_mode_matches_reference_and_drafts_nothing(target_llama):
    out = run(Engine(target_llama, drafter="none"), PROMPTS[1], 30, None)
    assert out.token_ids == reference_greedy(target_llama, PROMPTS[1], 30)
    assert out.stats.drafted_tokens == 0 and out.stats.target_forward_passes == 30
    # num_draft_tokens=0 turns drafting off for an engine that has a drafter
    out0 = run(Engine(target_llama, drafter="ngram"), PROMPTS[1], 30, 0)
    assert out0.token_ids == out.token_ids and out0.stats.drafted_tokens == 0


def test_float32_greedy_matches_within_stated_tie_tolerance():
    """In float32, a k+1-position verify and single-token decoding may round differently.
    We accept a divergence only where the reference's top-2 logits are within 1e-4 (a tie)."""
    import tiny

    target = tiny.wrap(tiny.llama(seed=0, dtype=torch.float32))
    engine = Engine(target, drafter="model", draft_model=tiny.wrap(tiny.llama(seed=0, dtype=torch.float32)))
    for prompt in PROMPTS:
        ours = run(engine, prompt, 40, 4).token_ids
        expected = reference_greedy(target, prompt, 40)
        if ours != expected:
            i = next(j for j, (a, b) in enumerate(zip(ours, expected)) if a != b)
            logits = target.model(torch.tensor([prompt + expected[:i]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, f"divergence at {i} is not a numerical tie"


def test_eos_stops_generation_and_is_included(target_llama):
    prompt = PROMPTS[0]
    expected = reference_greedy(target_llama, prompt, 20)
    eos = expected[7]
    target = type(target_llama)(target_llama.model, "eos-variant", eos_token_ids={eos})
    out = Engine(target, drafter="ngram").generate(prompt, max_new_tokens=20)
    assert out.token_ids == expected[: expected.index(eos) + 1]
    assert out.finish_reason == "stop"
