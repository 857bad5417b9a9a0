"""After a rejection and rewind, the cached state is exactly that of a fresh forward pass."""
from __future__ import annotations

import pytest
import torch

from specdec import Engine, SamplingParams


# Tolerance: Llama runs wholly in float64 (differences ~1e-13). Gemma's RMSNorm computes in
# float32 even in a float64 model, so 1- and n-position passes agree to ~5e-7. A wrong rewind
# (a stale or missing position) moves logits by O(1).
@pytest.mark.parametrize("model_name,atol", [("target_llama", 1e-9), ("target_gemma", 1e-5)])
def test_next_logits_after_rewind_equal_fresh_forward(request, model_name, atol, random_draft_llama):
    target = request.getfixturevalue(model_name)
    draft = random_draft_llama if model_name == "target_llama" else None
    engine = Engine(target, drafter="model", draft_model=draft) if draft else Engine(target, drafter="ngram")
    generation = engine.start([1, 5, 9, 5, 9, 5, 9, 33, 7], SamplingParams(max_new_tokens=40, num_draft_tokens=4))
    rejections = 0
    while not generation.finished:
        generation.step()
        rejections += generation.stats.provenance[-1] == "target" and generation.stats.drafted_tokens > 0
        length = generation.length
        assert target.cache_length(generation.cache) == length - 1
        probe = target.forward(generation.tokens[length - 1 : length], generation.cache, 1)
        fresh = target.forward(generation.tokens[:length], target.new_cache(), 1)
        torch.testing.assert_close(probe, fresh, rtol=0, atol=atol)
        target.rewind(generation.cache, length - 1)
    assert rejections > 0


def test_model_drafter_cache_tracks_accepted_prefix(target_llama, random_draft_llama):
    engine = Engine(target_llama, drafter="model", draft_model=random_draft_llama)
    generation = engine.start([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=30, num_draft_tokens=3))
    while not generation.finished:
        generation.step()
        drafter = generation.drafter
        cached = random_draft_llama.cache_length(drafter.cache)
        assert cached < generation.length  # never holds a token the target did not accept
        fresh = random_draft_llama.forward(generation.tokens[:cached], random_draft_llama.new_cache(), 1)
        probe = random_draft_llama.forward(generation.tokens[cached - 1 : cached], _copy(drafter, cached - 1), 1)
        torch.testing.assert_close(probe, fresh, rtol=0, atol=1e-9)


def _copy(drafter, length):
    import copy

    cache = copy.deepcopy(drafter.cache)
    drafter.model.rewind(cache, length)
    return cache
