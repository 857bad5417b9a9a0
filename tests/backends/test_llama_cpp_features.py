"""Feature heads on llama.cpp (the default path): the split head's hidden states are the
features, and speculative output with the shipped head is the backend's plain output.

Tolerance as in test_llama_cpp_backend.py: llama.cpp's batched and single-token kernels round
differently, so a greedy divergence is accepted only at a near-tie of plain's top-2 logits.
"""
from __future__ import annotations

import pytest
import torch

import specdec
from specdec import SamplingParams

llama_cpp = pytest.importorskip("llama_cpp")

from test_llama_cpp_backend import PROMPTS, plain_logits  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return specdec.load(drafter="ngram+feature", backend="llama.cpp", device="cpu")


def test_kept_features_are_what_the_head_turns_into_logits(engine):
    model = engine.target
    ids = torch.tensor(engine.encode(PROMPTS[0]))
    cache = model.new_cache()
    try:
        model.keep_features(cache)
        logits = model.forward(ids, cache, num_logits=4).clone()
        features = model.features(cache, 0, len(ids))
    finally:
        model.release(cache)
    assert features.shape == (len(ids), model.feature_size)
    columns = logits.topk(5, dim=-1).indices.flatten().unique()
    ours = features[-4:] @ model.head_rows(columns).T
    assert torch.allclose(ours, logits[:, columns], rtol=0.02, atol=0.05)


def test_a_prefill_keeps_the_features_a_verify_pass_computes(engine):
    model = engine.target
    ids = torch.tensor(engine.encode(PROMPTS[1]))
    kept = []
    for split in (len(ids) - 1, len(ids) - 5):
        cache = model.new_cache()
        try:
            model.keep_features(cache)
            model.prefill(ids[:split], cache)
            model.forward(ids[split:], cache, num_logits=1)
            kept.append(model.features(cache, 0, len(ids)).clone())
        finally:
            model.release(cache)
    similarity = torch.nn.functional.cosine_similarity(kept[0], kept[1], dim=-1)
    assert float(similarity.min()) > 0.995  # batched and single-row kernels round apart


@pytest.mark.parametrize("drafter", ["feature", "ngram+feature"])
def test_the_shipped_feature_head_gives_the_plain_output_and_is_accepted(engine, drafter):
    variant = engine.with_drafter(drafter)
    drafted = accepted = 0
    for prompt in PROMPTS:
        plain = variant.generate(prompt, max_new_tokens=40, num_draft_tokens=0)
        spec = variant.generate(prompt, max_new_tokens=40, num_draft_tokens=4)
        if spec.token_ids != plain.token_ids:
            i = next(j for j, (a, b) in enumerate(zip(spec.token_ids, plain.token_ids)) if a != b)
            top2 = plain_logits(variant, variant.encode(prompt) + plain.token_ids[:i]).topk(2).values
            assert float(top2[0] - top2[1]) < 0.5, f"divergence at {i} is not a near-tie"
        drafted += spec.stats.drafted_tokens
        accepted += spec.stats.accepted_tokens
    # A trained head: a random one is accepted ~0 % here. At a fixed k of 4 on these prompts the
    # shipped head (session 19) is accepted 27 % alone (session 18's: over 30 %; on the bench's
    # prompts at the adaptive k the new one is accepted more: 60 % against 51 %).
    assert accepted / drafted > 0.2


def test_sampled_output_with_the_feature_head_is_seeded_and_finishes(engine):
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=3, num_draft_tokens=3)
    first = engine.start(PROMPTS[2], params).run()
    again = engine.start(PROMPTS[2], params).run()
    assert first.token_ids == again.token_ids and len(first.token_ids) == 24
    assert first.stats.drafted_tokens > 0


def test_a_batch_with_feature_drafts_runs_every_request_to_its_end(engine):
    """The server's path: every sequence's catch-up and roll-out feeds in packed draft passes,
    one llama.cpp decode verifying all, each keeping its own features."""
    params = SamplingParams(max_new_tokens=32, num_draft_tokens=3)
    generations = [engine.start(p, params) for p in PROMPTS]
    stepper = engine.batch_stepper
    while any(not g.finished for g in generations):
        results = stepper.step([g for g in generations if not g.finished])
        assert not any(isinstance(r, BaseException) for r in results)
    assert all(len(g.output().token_ids) == 32 for g in generations)
    assert sum(g.stats.accepted_tokens for g in generations) > 0
