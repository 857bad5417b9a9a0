"""Penalties and logit biases under speculation: every verified position is adjusted as plain
decoding adjusts it, so greedy output is a reference loop's token for token and samples follow
the adjusted law (test_sampling_lossless.py)."""
from __future__ import annotations

import pytest
import torch

import tiny
from exactness import PROMPTS
from specdec import Engine, SamplingParams
from specdec.errors import InvalidRequestError
from specdec.logit_processing import adjusted_logits

SETTINGS = [
    dict(presence_penalty=0.8),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=-0.5, frequency_penalty=0.7, logit_bias={5: 3.0, 9: -100.0}),
]


def reference_row(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """One position, the slow way: a count per token of the output so far, then OpenAI's rule."""
    out = logits.double().clone()
    for token, bias in params.logit_bias:
        out[token] += bias
    for token in set(history):
        count = history.count(token)
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    return out


@pytest.mark.parametrize("settings", SETTINGS)
def test_each_verified_row_is_adjusted_as_plain_decoding_adjusts_its_position(settings):
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(**settings)
    for trial in range(20):
        k = trial % 6
        logits = torch.randn(k + 1, 40, generator=generator, dtype=torch.float64)
        output = torch.randint(0, 40, (trial,), generator=generator)
        drafts = torch.randint(0, 40, (k,), generator=generator)
        adjusted = adjusted_logits(logits, params, output, drafts)
        for j in range(k + 1):
            history = output.tolist() + drafts[:j].tolist()
            assert torch.allclose(adjusted[j].double(), reference_row(logits[j], params, history), atol=1e-5)


def reference_greedy(model, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """transformers' forward over the whole context at every step, adjusted by reference_row."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1]
            tokens.append(int(reference_row(logits, params, tokens).argmax()))
    return tokens


@pytest.mark.parametrize("k", [1, 3, 8, None])
@pytest.mark.parametrize("settings", SETTINGS)
def test_greedy_output_with_penalties_and_biases_equals_the_reference_loop(target_llama, self_draft_llama, settings, k):
    params = SamplingParams(max_new_tokens=30, num_draft_tokens=k, **settings)
    engines = [Engine(target_llama, drafter="ngram"), Engine(target_llama, drafter="model", draft_model=self_draft_llama)]
    accepted = 0
    for prompt in PROMPTS[:4]:
        expected = reference_greedy(target_llama.model, prompt, 30, params)
        for engine in engines:
            out = engine.start(prompt, params).run()
            assert out.token_ids == expected, (prompt, settings)
            accepted += out.stats.accepted_tokens
    assert accepted > 0  # drafts were accepted under the adjustments (the self-draft's, mostly)


def test_a_batch_mixing_adjusted_and_plain_requests_gives_each_its_own_output(target_llama, self_draft_llama):
    engine = Engine(target_llama, drafter="model", draft_model=self_draft_llama)
    requests = [(p, SamplingParams(max_new_tokens=24, num_draft_tokens=3, **s))
                for p, s in zip(PROMPTS, SETTINGS + [{}, {}, dict(logit_bias={7: 50.0})])]
    alone = [engine.start(p, params).run().token_ids for p, params in requests]
    generations = [engine.start(p, params) for p, params in requests]
    while any(not g.finished for g in generations):
        engine.batch_stepper.step([g for g in generations if not g.finished])
    assert [g.output().token_ids for g in generations] == alone


def test_a_large_bias_forces_its_token_and_a_ban_removes_it(target_llama):
    engine = Engine(target_llama, drafter="ngram")
    forced = engine.generate(PROMPTS[0], max_new_tokens=10, logit_bias={11: 100.0}).token_ids
    assert forced == [11] * 10
    plain = engine.generate(PROMPTS[0], max_new_tokens=10).token_ids
    banned = engine.generate(PROMPTS[0], max_new_tokens=10, logit_bias={t: -100.0 for t in set(plain)}).token_ids
    assert not set(banned) & set(plain)


@pytest.mark.parametrize("settings,field", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(presence_penalty=True), "presence_penalty"), (dict(logit_bias={5: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(logit_bias={t: 1.0 for t in range(301)}), "logit_bias"), (dict(logit_bias=[(3, 1.0), (3, 2.0)]), "logit_bias"),
])
def test_bad_penalties_and_biases_are_refused_naming_the_field(settings, field):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**settings)
    assert error.value.field == field


def test_a_bias_outside_the_vocabulary_is_refused(target_llama):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        Engine(target_llama).generate(PROMPTS[0], max_new_tokens=4, logit_bias={tiny.VOCAB: 1.0})
