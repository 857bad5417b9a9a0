"""Full sampled generations follow the target's distribution exactly (seeded, statistical).

A vocabulary of 16 and top-k 4 make the exact joint law of the first few tokens enumerable
from the target alone; specdec's samples must fit it, and the draft's own law (a different
distribution) must be rejected by the same test, which proves its power. The generations are
as long as a step's k + 1 tokens, so that the first step can draft k and accept them all: the
tests check that steps did accept several drafts, not only one.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.logits import to_probs
from specdec.backends.hf import HFCausalLM
import tiny
from stats_util import chi2_critical, chi2_statistic

pytestmark = pytest.mark.heavy

VOCAB = 16
PROMPT = [1, 5, 9, 3]
ADAPTIVE_LENGTH = 4  # tokens per sample where k is the policy's (up to 3 drafts in the first step)


def law_length(k: int | None) -> int:
    """Tokens per sample: enough for a first step of k drafts plus its own token."""
    return ADAPTIVE_LENGTH if k is None else k + 1


@pytest.fixture(scope="module")
def pair():
    # no EOS: the enumerated law treats every token alike
    target = HFCausalLM(tiny.llama(seed=3, vocab=VOCAB, hidden=32), "t16", eos_token_ids=set())
    draft = HFCausalLM(tiny.llama(seed=4, vocab=VOCAB, hidden=32), "d16", eos_token_ids=set())
    return target, draft


@torch.no_grad()
def exact_law(model, params, prompt=PROMPT, allowed: list[set[int]] | None = None) -> torch.Tensor:
    """[VOCAB ** n] the target's probability of each n-token continuation, n = max_new_tokens;
    a sequence t is at index sum(t_i * VOCAB ** (n - 1 - i)). allowed: the tokens a constraint
    allows at each position (the others' logits are -inf before sampling settings apply)."""
    n = params.max_new_tokens
    law = torch.zeros(VOCAB**n, dtype=torch.float64)

    def extend(prefix: list[int], mass: float) -> None:
        logits = _adjusted(model.model(torch.tensor([prompt + prefix])).logits[0, -1:], params, prefix)
        if allowed is not None:
            banned = [t for t in range(VOCAB) if t not in allowed[len(prefix)]]
            logits[0, banned] = float("-inf")
        probs = to_probs(logits, params)[0].double()
        for token in torch.nonzero(probs).flatten().tolist():
            if len(prefix) + 1 == n:
                law[_index(prefix + [token])] = mass * probs[token]
            else:
                extend(prefix + [token], mass * float(probs[token]))

    extend([], 1.0)
    return law


def _adjusted(logits: torch.Tensor, params, history: list[int]) -> torch.Tensor:
    """OpenAI's logit_bias and penalties over the output so far, one token at a time (the slow way)."""
    logits = logits.clone()
    for token, bias in params.logit_bias:
        logits[0, token] += bias
    for token in set(history):
        logits[0, token] -= params.frequency_penalty * history.count(token) + params.presence_penalty
    return logits


def _index(tokens: list[int]) -> int:
    index = 0
    for t in tokens:
        index = index * VOCAB + t
    return index


def sample_counts(engine, params, n, seed0, prompt=PROMPT) -> tuple[torch.Tensor, int]:
    """Counts of n seeded samples over exact_law's index, and the most drafts a step accepted."""
    counts = torch.zeros(VOCAB**params.max_new_tokens)
    deepest = 0
    for i in range(n):
        p = dataclasses.replace(params, seed=seed0 + i)
        out = engine.start(prompt, p).run()
        counts[_index(out.token_ids)] += 1
        deepest = max(deepest, _longest_draft_run(out.provenance))
    return counts, deepest


def _longest_draft_run(provenance: list[str]) -> int:
    """A step emits its accepted drafts, then the target's token: the longest run of drafts."""
    longest = run = 0
    for source in provenance:
        run = run + 1 if source == "draft" else 0
        longest = max(longest, run)
    return longest


def assert_fits(counts: torch.Tensor, law: torch.Tensor) -> None:
    stat, df = chi2_statistic(counts, law)
    assert stat < chi2_critical(df, 1e-3), f"chi2 {stat:.1f} on {df} df"


def assert_self_draft_follows_target_law(target, params, draft, seed0: int) -> None:
    engine = Engine(target, drafter="self", draft_model=draft)
    counts, deepest = sample_counts(engine, params, 2000, seed0=seed0)
    assert_fits(counts, exact_law(target, params))
    assert deepest == params.num_draft_tokens  # a whole draft was accepted in one step


@pytest.mark.parametrize("temperature,top_k,top_p,k", [(1.0, 4, 1.0, 3), (0.7, 4, 0.9, 1), (1.3, 4, 1.0, None)])
def test_sampled_generations_follow_target_law(pair, temperature, top_k, top_p, k):
    target, draft = pair
    params = SamplingParams(max_new_tokens=law_length(k), temperature=temperature, top_k=top_k, top_p=top_p,
                            num_draft_tokens=k)
    law = exact_law(target, params)
    if k is None:  # the policy drafts only where a draft token costs well under a target pass
        draft = HFCausalLM(tiny.llama(seed=4, vocab=VOCAB, hidden=32, layers=1), "d16-1", eos_token_ids=set())
    engine = Engine(target, drafter="model", draft_model=draft)
    counts, deepest = sample_counts(engine, params, 2500, seed0=1000)
    assert_fits(counts, law)
    # Steps accepted drafts, several at once where k allows (the policy drafts one at a time here).
    assert deepest >= min(k or 1, 2)
    df = chi2_statistic(counts, law)[1]
    # power: the draft's own law differs, and the same test with the same n tells them apart
    draft_law = exact_law(draft, params)
    draft_counts = (draft_law * 2500).round()
    assert chi2_statistic(draft_counts, law)[0] > chi2_critical(df, 1e-3)


def test_self_draft_sampling_follows_target_law(pair):
    from specdec.draft_models.self_draft import build_self_draft

    target, _ = pair
    params = SamplingParams(max_new_tokens=law_length(2), temperature=1.0, top_k=4, num_draft_tokens=2)
    assert_self_draft_follows_target_law(target, params, build_self_draft(target, "bfloat16"), seed0=300)


def test_int8_self_draft_sampling_follows_target_law():
    # int8 weights (weight-only, native one-token step) make q differ from the target's p by
    # quantization error: every sample must still follow p exactly.
    from specdec.draft_models.self_draft import build_self_draft

    target = HFCausalLM(tiny.llama(seed=3, vocab=VOCAB, hidden=32, dtype=torch.float32), "t16f", eos_token_ids=set())
    params = SamplingParams(max_new_tokens=law_length(2), temperature=1.0, top_k=4, num_draft_tokens=2)
    assert_self_draft_follows_target_law(target, params, build_self_draft(target, "int8"), seed0=600)


def test_subset_vocabulary_self_draft_sampling_follows_target_law(pair):
    # The draft's head scores 6 of 16 tokens (plus the prompt's own): q is zero for the rest,
    # where every sample must come from the residual distribution.
    from specdec.draft_models.self_draft import build_self_draft

    target, _ = pair
    params = SamplingParams(max_new_tokens=law_length(2), temperature=1.0, top_k=6, num_draft_tokens=2)
    ranking = torch.tensor([0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15])
    draft = build_self_draft(target, "bfloat16", draft_vocab=6, token_ranking=ranking)
    assert_self_draft_follows_target_law(target, params, draft, seed0=900)


def test_ngram_drafter_sampling_follows_target_law(pair):
    target, _ = pair
    params = SamplingParams(max_new_tokens=law_length(2), temperature=1.0, top_k=4, num_draft_tokens=2)
    engine = Engine(target, drafter="ngram")
    # The target's own greedy path, twice begun: the lookup proposes what the target favours.
    path = Engine(target, drafter="none").generate(PROMPT, max_new_tokens=8).token_ids
    repetitive = path + path[:2]
    counts, deepest = sample_counts(engine, params, 2500, seed0=7, prompt=repetitive)
    assert_fits(counts, exact_law(target, params, prompt=repetitive))
    assert deepest == 2


def test_same_seed_gives_same_sample(pair):
    target, draft = pair
    engine = Engine(target, drafter="model", draft_model=draft)
    a = engine.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=5).token_ids
    b = engine.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=5).token_ids
    c = engine.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=6).token_ids
    assert a == b and a != c


def test_distilled_draft_sampling_follows_target_law(pair, tmp_path):
    # A draft directory made by specdec distill, loaded onto the float64 target: its head scores
    # 6 of 16 tokens, so q is zero elsewhere and those samples come from the residual.
    from specdec.distill.train import TrainingConfig, distil
    from specdec.draft_models.distilled_draft import TargetIdentity, load_distilled_draft

    target, _ = pair
    text = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    distil(target.model, TargetIdentity.of(target.model, VOCAB, None), text, tmp_path,
           TrainingConfig(layers=1, steps=4, batch_size=4, progress=False), torch.tensor([0, 2, 4, 6, 8, 10]))
    draft = load_distilled_draft(tmp_path, target, None)
    params = SamplingParams(max_new_tokens=law_length(2), temperature=1.0, top_k=6, num_draft_tokens=2)
    engine = Engine(target, drafter="model", draft_model=draft)
    counts, deepest = sample_counts(engine, params, 2000, seed0=4242)
    assert_fits(counts, exact_law(target, params))
    assert deepest == 2
    assert engine.generate(PROMPT, max_new_tokens=4, temperature=1.0, seed=1).stats.drafted_tokens > 0


def test_feature_head_sampling_follows_target_law():
    # A feature head (drafters/feature.py) on a one-layer target, its head over 6 of 16 tokens
    # (plus the prompt's): its drafts are accepted, two in a step, and samples follow p.
    from specdec.backends.compact_decoder import CompactDecoder
    from specdec.draft_models.feature_head import FeatureDecoder

    model = tiny.llama(seed=3, vocab=VOCAB, hidden=32, layers=1)
    target = CompactDecoder(model, "t16-1", model.dtype, set(), VOCAB)
    head = FeatureDecoder(tiny.feature_head(model, copy=True), target, torch.tensor([0, 2, 4, 6, 8, 10]), "head")
    params = SamplingParams(max_new_tokens=law_length(2), temperature=1.0, top_k=6, num_draft_tokens=2)
    counts, deepest = sample_counts(Engine(target, drafter="feature", draft_model=head), params, 2000, seed0=5150)
    assert_fits(counts, exact_law(target, params))
    assert deepest == 2


def test_penalties_and_biases_sampling_follows_the_adjusted_target_law(pair):
    # Each verified position is adjusted for the drafts before it (logit_processing.py); the
    # draft (the target's own weights) drafts unadjusted, so q differs from p where it counts.
    from specdec.draft_models.self_draft import build_self_draft

    target, _ = pair
    params = SamplingParams(max_new_tokens=law_length(2), temperature=1.0, top_k=4, num_draft_tokens=2,
                            presence_penalty=0.6, frequency_penalty=0.9, logit_bias={3: 1.5, 7: -2.0})
    engine = Engine(target, drafter="model", draft_model=build_self_draft(target, "bfloat16"))
    counts, deepest = sample_counts(engine, params, 2000, seed0=7100)
    law = exact_law(target, params)
    assert_fits(counts, law)
    assert deepest == 2
    unadjusted = exact_law(target, dataclasses.replace(params, presence_penalty=0.0, frequency_penalty=0.0,
                                                       logit_bias=()))
    df = chi2_statistic(counts, law)[1]
    assert chi2_statistic((unadjusted * 2000).round(), law)[0] > chi2_critical(df, 1e-3)  # the test can tell


# A hex-string grammar, position by position: a class, a forced "a", then classes. Forced
# tokens are drafted for free (alone, or after the draft's own tokens); draft tokens it refuses
# are cut (a sampled draft's just after: its certain rejection resamples from its residual).
HEX_REGEX = "[0-7]a[c-f0-3][0-9][0-9]"
HEX_ALLOWED = [set(range(8)), {10}, {12, 13, 14, 15, 0, 1, 2, 3}, set(range(10)), set(range(10))]


@pytest.mark.parametrize("drafter,k,seed0", [("model", 1, 8100), ("self", 2, 8300), ("ngram", 2, 8400)])
def test_grammar_constrained_sampling_follows_the_constrained_target_law(pair, drafter, k, seed0):
    from specdec.draft_models.self_draft import build_self_draft

    target, draft = pair
    draft_model = {"model": draft, "self": build_self_draft(target, "bfloat16"), "ngram": None}[drafter]
    engine = Engine(target, tiny.hex_tokenizer(), drafter, draft_model)
    params = SamplingParams(max_new_tokens=5, temperature=1.0, top_k=4, num_draft_tokens=k,
                            response_format={"type": "regex", "regex": HEX_REGEX})
    prompt = PROMPT
    if drafter == "ngram":  # the lookup proposes the target's own constrained greedy path
        path = Engine(target, tiny.hex_tokenizer(), "none").generate(
            PROMPT, max_new_tokens=5, response_format=params.response_format).token_ids
        prompt = PROMPT + [8] + path + [8]
    counts, deepest = sample_counts(engine, params, 2000, seed0=seed0, prompt=prompt)
    law = exact_law(target, params, prompt, HEX_ALLOWED)
    assert_fits(counts, law)
    assert deepest >= 2  # a step accepted two drafts (a forced one among them, or the draft's own)
    df = chi2_statistic(counts, law)[1]
    # power: the draft's own law under the same constraint differs, and the test tells them apart
    other = exact_law(pair[1], params, prompt, HEX_ALLOWED)
    assert chi2_statistic((other * 2000).round(), law)[0] > chi2_critical(df, 1e-3)
