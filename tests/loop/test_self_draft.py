"""The self-draft (a cheaper copy of the target) and the n-gram+model hybrid: exact, and it fits."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import specdec
from specdec import Engine
from specdec.backends.compact_decoder import CompactDecoder, compact_target_for
from specdec.sampling_params import SamplingParams
from specdec.draft_models.self_draft import build_self_draft, resolve_scheme
import tiny
from exactness import PROMPTS, reference_greedy, run


@pytest.fixture(scope="module")
def bf16_self_draft(target_llama):
    return build_self_draft(target_llama, "bfloat16")


@pytest.mark.parametrize("k", [1, 3, 8, None])
@pytest.mark.parametrize("drafter", ["self", "ngram+self"])
def test_self_draft_greedy_equals_target_greedy(target_llama, bf16_self_draft, drafter, k):
    engine = Engine(target_llama, drafter=drafter, draft_model=bf16_self_draft)
    for prompt in PROMPTS:
        assert run(engine, prompt, 40, k).token_ids == reference_greedy(target_llama, prompt, 40), prompt


def test_self_draft_agrees_with_target_and_shares_its_embedding(target_llama, bf16_self_draft):
    out = Engine(target_llama, drafter="self", draft_model=bf16_self_draft).generate(PROMPTS[0], max_new_tokens=60,
                                                                                      num_draft_tokens=4)
    assert out.stats.acceptance_rate > 0.8
    assert bf16_self_draft.embedding is target_llama.model.get_input_embeddings()
    # the target's own layers are untouched
    assert target_llama.model.lm_head.weight.dtype == torch.float64


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def float32_target(request):
    model = tiny.llama(seed=0, dtype=torch.float32) if request.param == "llama" else tiny.gemma3(0, dtype=torch.float32)
    return tiny.wrap(model, request.param)


@pytest.mark.parametrize("k", [1, 4, None])
@pytest.mark.parametrize("drafter", ["self", "ngram+self"])
def test_int8_self_draft_is_exact_within_tie_tolerance(float32_target, drafter, k):
    target = float32_target
    draft = build_self_draft(target, "int8")
    assert isinstance(draft, CompactDecoder)  # weight-only int8, not a dynamically quantized clone
    engine = Engine(target, drafter=drafter, draft_model=draft)
    accepted = 0
    for prompt in PROMPTS[:4]:
        out = run(engine, prompt, 40, k)
        ours = out.token_ids
        accepted += out.stats.accepted_tokens
        expected = reference_greedy(target, prompt, 40)
        if ours != expected:
            i = next(j for j, (a, b) in enumerate(zip(ours, expected)) if a != b)
            top2 = target.model(torch.tensor([prompt + expected[:i]])).logits[0, -1].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4
    assert accepted > 0  # the draft was used, not bypassed


@pytest.mark.parametrize("drafter", ["self", "ngram+self"])
def test_self_draft_reads_context_it_has_not_seen_from_the_compact_targets_cache(float32_target, drafter):
    target = compact_target_for(float32_target)
    draft = build_self_draft(float32_target, "int8")
    assert draft.renders_same_model(target) and not draft.renders_same_model(draft)
    engine = Engine(target, drafter=drafter, draft_model=draft)
    prompt = PROMPTS[0]
    generation = engine.start(prompt, SamplingParams(max_new_tokens=30, num_draft_tokens=3))
    generation.step()
    model_drafter = getattr(generation.drafter, "model_drafter", generation.drafter)
    if drafter == "self":  # the first proposal fed one position, not the prompt
        assert generation.stats.draft_positions == 3
        n = len(prompt) - 1
        for mine, theirs in zip(model_drafter.cache.keys, generation.cache.keys):
            assert torch.equal(mine[:, :n], theirs[:, :n])
    while not generation.finished:
        generation.step()
    assert generation.output().token_ids == reference_greedy(float32_target, prompt, 30)


def test_a_draft_of_another_model_computes_its_own_context(float32_target):
    other = tiny.wrap(tiny.llama(seed=1, dtype=torch.float32))
    target = compact_target_for(float32_target)
    assert not compact_target_for(other).renders_same_model(target)


def test_auto_precision_is_int8_for_float32_cpu_targets_only(target_llama):
    float32 = tiny.wrap(tiny.llama(seed=0, dtype=torch.float32))
    assert resolve_scheme(float32, "auto") == "int8"
    assert resolve_scheme(target_llama, "auto") == "bfloat16"  # float64: int8 products are float32
    assert resolve_scheme(float32, "bfloat16") == "bfloat16"


def test_hybrid_uses_lookup_when_the_context_repeats(target_llama, bf16_self_draft):
    engine = Engine(target_llama, drafter="ngram+self", draft_model=bf16_self_draft)
    out = engine.generate([1, 7, 7, 7, 7, 7, 7, 7, 7], max_new_tokens=30, num_draft_tokens=4)
    assert out.token_ids == reference_greedy(target_llama, [1, 7, 7, 7, 7, 7, 7, 7, 7], 30)


def test_self_drafter_from_api_and_cli(tiny_model_dir):
    engine = specdec.load(target=str(tiny_model_dir), drafter="self", device="cpu")
    plain = engine.generate("the quick brown fox", max_new_tokens=20, num_draft_tokens=0)
    assert engine.generate("the quick brown fox", max_new_tokens=20).token_ids == plain.token_ids
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "generate", "--target", str(tiny_model_dir),
                           "--drafter", "self", "--self-draft", "int8", "--prompt", "the lazy", "--json",
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_transformers_clone_self_draft_is_exact_and_shares_the_embedding(target_gemma):
    # Where the compact decoder does not apply (here: forced), the self-draft is a transformers
    # clone with its own subset head.
    from specdec.draft_models import self_draft

    ranking = torch.randperm(target_gemma.vocab_size, generator=torch.Generator().manual_seed(2))
    draft = self_draft._clone_self_draft(target_gemma, "bfloat16", 64, ranking)
    assert draft.output_token_ids.shape == (64,) and draft.vocab_size == target_gemma.vocab_size
    assert draft.model.get_input_embeddings().weight is target_gemma.model.get_input_embeddings().weight
    engine = Engine(target_gemma, drafter="self", draft_model=draft)
    for prompt in PROMPTS[:4]:
        assert run(engine, prompt, 30, 3).token_ids == reference_greedy(target_gemma, prompt, 30), prompt


def test_self_draft_vocabulary_comes_from_a_cached_corpus_ranking(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    engine = specdec.load(target=str(tiny_model_dir), drafter="self", draft_vocab=100, device="cpu")
    assert engine.draft_model.output_token_ids.shape == (100,)
    assert len(list((tmp_path / "token-rankings").glob("*.json"))) == 1
    plain = engine.generate("the quick brown fox", max_new_tokens=20, num_draft_tokens=0)
    assert engine.generate("the quick brown fox", max_new_tokens=20).token_ids == plain.token_ids


def test_self_drafter_rejects_a_named_draft_and_bad_precision(tiny_model_dir, tiny_draft_dir):
    with pytest.raises(specdec.SpecDecError, match="does not use one"):
        specdec.load(target=str(tiny_model_dir), draft=str(tiny_draft_dir), drafter="self")
    with pytest.raises(specdec.SpecDecError, match="self-draft precision"):
        specdec.load(target=str(tiny_model_dir), drafter="self", self_draft="int3")
    with pytest.raises(specdec.SpecDecError, match="draft_vocab"):
        specdec.load(target=str(tiny_model_dir), drafter="self", draft_vocab=0)
