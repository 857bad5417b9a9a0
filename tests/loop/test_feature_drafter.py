"""A feature head (EAGLE-style) drafts from the target's own hidden states, losslessly.

The target keeps its final hidden states per sequence (backends/features.py); the drafter
replays the verified positions with them and rolls its own predictions forward. These tests
prove the output is the target's greedy output with heads that are mostly right (a copy of a
one-layer target's layer: drafts are accepted, several per step) and mostly wrong (random),
on Llama and Gemma 3 layouts, alone and in a batch.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from exactness import PROMPTS, reference_greedy, run
from specdec import Engine
from specdec.backends.compact_decoder import CompactDecoder
from specdec.backends.features import FeatureLog
from specdec.draft_models.feature_head import FeatureDecoder
from specdec.errors import SpecDecError

ALL_TOKENS = torch.arange(tiny.VOCAB)


def compact(model) -> CompactDecoder:
    return CompactDecoder(model, "tiny", model.dtype, {2}, model.config.vocab_size)


@pytest.fixture(scope="module")
def one_layer():
    model = tiny.llama(seed=0, layers=1)
    return model, compact(model)


def feature_engine(model, target, copy: bool, drafter: str = "feature", token_map=ALL_TOKENS) -> Engine:
    head = FeatureDecoder(tiny.feature_head(model, copy=copy), target, token_map, "head")
    return Engine(target, drafter=drafter, draft_model=head)


@pytest.mark.parametrize("k", [1, 3, 6, None])
@pytest.mark.parametrize("copy", [True, False])
def test_feature_drafts_give_the_target_greedy_output(one_layer, copy, k):
    model, target = one_layer
    engine = feature_engine(model, target, copy)
    accepted = 0
    for prompt in PROMPTS:
        out = run(engine, prompt, 40, k)
        assert out.token_ids == reference_greedy(target, prompt, 40), f"prompt {prompt}"
        accepted += out.stats.accepted_tokens
    if copy and k in (3, 6):  # the copied head's drafts are accepted, several in a step (adaptive k
        # drafts little here: on a one-layer target the head costs what a target pass does)
        assert accepted > 100


def test_copied_head_accepts_most_drafts_and_random_head_few(one_layer):
    model, target = one_layer
    prompt = PROMPTS[3]
    good = run(feature_engine(model, target, copy=True), prompt, 60, 4).stats
    bad = run(feature_engine(model, target, copy=False), prompt, 60, 4).stats
    assert good.acceptance_rate > 0.6 and good.per_position_acceptance[3] > 0.3
    assert bad.acceptance_rate < 0.2


@pytest.mark.parametrize("k", [2, 5])
def test_gemma_layout_with_a_subset_head_stays_exact(k):
    """Gemma 3 (sliding window 8, scaled embeddings, its norms) and a head over part of the
    vocabulary, extended per sequence with its context's tokens."""
    model = tiny.gemma3(seed=0)
    target = compact(model)
    engine = feature_engine(model, target, copy=True, token_map=torch.arange(0, tiny.VOCAB, 3))
    for prompt in PROMPTS[:4]:
        assert run(engine, prompt, 50, k).token_ids == reference_greedy(target, prompt, 50)


def test_ngram_then_feature_hybrid_is_exact(one_layer):
    model, target = one_layer
    engine = feature_engine(model, target, copy=True, drafter="ngram+feature")
    for prompt in PROMPTS:
        assert run(engine, prompt, 40, None).token_ids == reference_greedy(target, prompt, 40)


def test_batched_steps_with_feature_drafts_equal_each_request_alone(one_layer):
    from specdec import SamplingParams

    model, target = one_layer
    engine = feature_engine(model, target, copy=True)
    params = SamplingParams(max_new_tokens=30, num_draft_tokens=3)
    alone = [engine.generate(p, max_new_tokens=30, num_draft_tokens=3).token_ids for p in PROMPTS]
    generations = [engine.start(p, params) for p in PROMPTS]
    stepper = engine.batch_stepper
    while any(not g.finished for g in generations):
        stepper.step([g for g in generations if not g.finished])
    assert [g.output().token_ids for g in generations] == alone
    assert sum(g.stats.accepted_tokens for g in generations) > 0


def test_feature_log_keeps_positions_and_overwrites_from_a_rewind():
    log = FeatureLog()
    log.write(0, torch.arange(5.0)[:, None])
    log.write(3, torch.tensor([[30.0], [40.0], [50.0]]))  # positions 3.. again: a rewound pass
    assert log.read(0, 6).flatten().tolist() == [0, 1, 2, 30, 40, 50]
    log.forget_before(4)
    assert log.read(4, 6).flatten().tolist() == [40, 50]
    with pytest.raises(RuntimeError):
        log.read(2, 5)  # forgotten
    log.write(9, torch.ones(2, 1))  # a gap: the log starts over there
    assert (log.start, log.end) == (9, 11)


def test_target_features_are_what_its_head_reads(one_layer):
    """The kept features reproduce the target's logits through its head, and a prefill keeps
    the same features as a verify pass over the same positions."""
    model, target = one_layer
    ids = torch.tensor(PROMPTS[3])
    cache = target.new_cache()
    target.keep_features(cache)
    logits = target.forward(ids, cache, num_logits=len(ids))
    features = target.features(cache, 0, len(ids))
    head = target.head_rows(torch.arange(tiny.VOCAB)).to(features.dtype)
    assert torch.allclose(features @ head.T, logits.to(features.dtype), atol=1e-4)
    other = target.new_cache()
    target.keep_features(other)
    target.prefill(ids[:-3], other)
    target.forward(ids[-3:], other, num_logits=1)
    assert torch.allclose(target.features(other, 0, len(ids)), features, atol=1e-5)


def test_feature_drafter_names_its_misuse(one_layer):
    model, target = one_layer
    head = FeatureDecoder(tiny.feature_head(model, copy=True), target, ALL_TOKENS, "head")
    with pytest.raises(SpecDecError, match="feature head"):
        Engine(target, drafter="model", draft_model=head)
    with pytest.raises(SpecDecError, match="feature head"):
        Engine(target, drafter="feature", draft_model=tiny.wrap(tiny.llama(seed=1)))
