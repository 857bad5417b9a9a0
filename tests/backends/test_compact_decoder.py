"""The compact decoder computes what `transformers` computes, with a cache that rewinds by length."""
from __future__ import annotations

import pytest
import torch

from specdec import Engine
from specdec.backends import compact_decoder
from specdec.backends.compact_decoder import CompactDecoder, UnsupportedArchitecture
from specdec.backends.hf import HFCausalLM
from specdec.draft_models.self_draft import build_self_draft
import tiny
from exactness import PROMPTS, reference_greedy, run


def _pair(family: str) -> tuple[HFCausalLM, CompactDecoder]:
    model = tiny.llama(0, dtype=torch.float32) if family == "llama" else tiny.gemma3(0, dtype=torch.float32)
    reference = HFCausalLM(model, family)
    return reference, CompactDecoder(model, family, torch.float32, set(reference.eos_token_ids), reference.vocab_size)


def worst_gap_through_rewinds(reference, model, ids: torch.Tensor, step: int, keep: int, prefill: int = 20) -> float:
    """Feed both models the same prompt, then verify-like steps of `step` tokens of which
    only `keep` are kept (a rewind), and re-feed the rest; the largest logit difference."""
    ref_cache, cache = reference.new_cache(), model.new_cache()
    reference.prefill(ids[:prefill], ref_cache)
    model.prefill(ids[:prefill], cache)
    worst = 0.0
    for start in range(prefill, ids.shape[0] - step + 1, step):
        for m, c in ((reference, ref_cache), (model, cache)):
            m.forward(ids[start : start + step], c, step)
            m.rewind(c, start + keep)  # reject the rest, as a verify step would
        a = reference.forward(ids[start + keep : start + step], ref_cache, step - keep)
        b = model.forward(ids[start + keep : start + step], cache, step - keep)
        worst = max(worst, float((a - b).abs().max()))
        assert model.cache_length(cache) == reference.cache_length(ref_cache) == start + step
    return worst


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_logits_match_transformers_through_prefill_steps_and_rewinds(family, monkeypatch):
    # A small initial capacity makes the cache grow mid-sequence; the Gemma model's sliding
    # window (8) is crossed many times over 60 positions.
    monkeypatch.setattr(compact_decoder, "INITIAL_CAPACITY", 4)
    reference, compact = _pair(family)
    ids = torch.randint(3, tiny.VOCAB, (60,), generator=torch.Generator().manual_seed(1))
    worst = worst_gap_through_rewinds(reference, compact, ids, step=4, keep=1)
    assert worst < 1e-4, worst


def test_rewind_past_the_end_is_refused():
    _, compact = _pair("llama")
    cache = compact.new_cache()
    compact.prefill(torch.tensor([1, 5, 7]), cache)
    with pytest.raises(ValueError, match="cannot rewind"):
        compact.rewind(cache, 4)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        CompactDecoder(model, "gpt2", torch.float32, set(), 64)


def test_subset_head_scores_its_tokens_and_the_contexts_own():
    reference, _ = _pair("gemma3")
    subset = torch.arange(100, 200)
    compact = CompactDecoder(reference.model, "subset", torch.float32, set(), reference.vocab_size, subset)
    context = torch.tensor([5, 150, 300, 5, 301])
    cache = compact.new_cache()
    compact.cover_context(cache, context)
    columns = compact.column_token_ids(cache)
    assert columns[:100].tolist() == subset.tolist() and sorted(columns[100:].tolist()) == [5, 300, 301]
    full = reference.forward(context, reference.new_cache(), 1)[0]
    ours = compact.forward(context, cache, 1)[0]
    assert torch.allclose(ours, full[columns], atol=1e-4)
    compact.cover_context(cache, torch.cat([context, torch.tensor([300, 7])]))  # only 7 is new
    assert sorted(compact.column_token_ids(cache)[100:].tolist()) == [5, 7, 300, 301]


@pytest.mark.parametrize("k", [2, 5, None])
def test_subset_vocabulary_self_draft_is_exact(target_gemma, k):
    # The head keeps 64 of 384 tokens: most target picks are outside it unless the context has them.
    ranking = torch.randperm(target_gemma.vocab_size, generator=torch.Generator().manual_seed(0))
    draft = build_self_draft(target_gemma, "bfloat16", draft_vocab=64, token_ranking=ranking)
    assert isinstance(draft, CompactDecoder)
    engine = Engine(target_gemma, drafter="self", draft_model=draft)
    accepted = 0
    for prompt in PROMPTS:
        out = run(engine, prompt, 30, k)
        assert out.token_ids == reference_greedy(target_gemma, prompt, 30), prompt
        accepted += out.stats.accepted_tokens
    assert accepted > 0  # the subset draft does propose what the target picks


def test_compute_estimate_counts_the_same_weights_as_for_transformers_models():
    reference, compact = _pair("llama")
    assert compact.flops_per_token() == reference.flops_per_token() > 0
    subset = CompactDecoder(reference.model, "s", torch.float32, set(), reference.vocab_size, torch.arange(10))
    head = reference.model.get_output_embeddings().weight
    assert reference.flops_per_token() - subset.flops_per_token() == 2.0 * (head.shape[0] - 10) * head.shape[1]
