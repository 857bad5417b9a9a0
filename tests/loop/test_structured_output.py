"""Structured outputs under speculation (grammar.py): every verified row is masked by the grammar's
state after the drafts before it, and forced tokens are drafted for free, so greedy output is
a reference constrained loop's token for token (the sampling law: test_sampling_lossless.py)."""
from __future__ import annotations

import json

import jsonschema
import llguidance
import llguidance.hf
import pytest
import torch

import tiny
from exactness import PROMPTS
from specdec import Engine, SamplingParams
from specdec.errors import InvalidRequestError
from specdec.grammar import grammar_text
from specdec.response_format import ResponseFormat

EOS = 2
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "member": {"type": "boolean"}}}
FORMATS = {
    "json_schema": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    "regex": {"type": "regex", "regex": r"(fox|dog)s? (jump|run)[a-z]{0,6}\. [0-9]{2,4}"},
    "choice": {"type": "choice", "choice": ["the quick brown fox", "the lazy dog", "speculative decoding"]},
    "grammar": {"type": "grammar", "grammar": 'start: "def " NAME "(" NAME "):" \nNAME: /[a-z]{1,5}/'},
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def engines(target_llama, self_draft_llama, random_draft_llama, tokenizer):
    return {"ngram": Engine(target_llama, tokenizer, "ngram"),
            "self": Engine(target_llama, tokenizer, "model", self_draft_llama),
            "random": Engine(target_llama, tokenizer, "model", random_draft_llama)}


def reference_constrained_greedy(model, tokenizer, prompt: list[int], n: int, response_format) -> list[int]:
    """transformers' forward over the whole context at every step, masked by a fresh matcher's
    byte-per-token mask (llguidance's compute_logit_bias, not the bitmask grammar.py unpacks)."""
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=tiny.VOCAB, eos_token=[EOS])
    matcher = llguidance.LLMatcher(lltokenizer, grammar_text(ResponseFormat.parse(response_format)), log_level=0)
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1]
            allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[: tiny.VOCAB] > 0
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            tokens.append(token)
            if token == EOS:
                break
            assert matcher.consume_token(token)
    return tokens


@pytest.mark.parametrize("name", list(FORMATS))
def test_greedy_constrained_output_equals_the_reference_loop_for_every_drafter_and_k(
        target_llama, tokenizer, engines, name):
    response_format = FORMATS[name]
    drafted = 0
    for prompt in PROMPTS[:3]:
        expected = reference_constrained_greedy(target_llama.model, tokenizer, prompt, 48, response_format)
        for drafter, engine in engines.items():
            for k in (0, 1, 4, 8, None):
                out = engine.generate(prompt, max_new_tokens=48, num_draft_tokens=k, response_format=response_format)
                assert out.token_ids == expected, (name, prompt, drafter, k)
                drafted += out.stats.drafted_tokens
        if expected[-1] == EOS and name == "json_schema":
            jsonschema.validate(json.loads(tokenizer.decode(expected[:-1])), PERSON)
    assert drafted > 0


def test_forced_tokens_are_drafted_at_no_model_cost_and_all_accepted(target_llama, tokenizer):
    # No lookup match in this prompt, so every draft is one the grammar forced (the keys, the
    # punctuation between the values): the same output in far fewer target passes.
    engine = Engine(target_llama, tokenizer, "ngram")
    prompt = PROMPTS[3]
    plain = engine.generate(prompt, max_new_tokens=64, num_draft_tokens=0, response_format=FORMATS["json_schema"])
    fast = engine.generate(prompt, max_new_tokens=64, response_format=FORMATS["json_schema"])
    assert fast.token_ids == plain.token_ids and fast.finish_reason == "stop"
    jsonschema.validate(json.loads(fast.text), PERSON)
    assert fast.stats.accepted_tokens == fast.stats.drafted_tokens >= 10
    assert fast.stats.target_forward_passes <= plain.stats.target_forward_passes - 10


def test_drafts_the_grammar_refuses_are_cut_and_the_drafter_still_follows(target_llama, random_draft_llama,
                                                                          tokenizer):
    # A random draft model's tokens are mostly refused: the output is still exact, and the
    # draft's cache keeps pace with the output (its drafts stay exact after many cut steps).
    engine = Engine(target_llama, tokenizer, "model", random_draft_llama)
    for prompt in PROMPTS[:3]:
        out = engine.generate(prompt, max_new_tokens=48, num_draft_tokens=4, response_format=FORMATS["regex"])
        expected = reference_constrained_greedy(target_llama.model, tokenizer, prompt, 48, FORMATS["regex"])
        assert out.token_ids == expected


def test_a_batch_mixing_constrained_and_plain_requests_gives_each_its_own_output(engines):
    engine = engines["self"]
    formats = [FORMATS["json_schema"], None, FORMATS["regex"], None, FORMATS["choice"], {"type": "json_object"}]
    requests = [(p, SamplingParams(max_new_tokens=40, num_draft_tokens=3, response_format=f))
                for p, f in zip(PROMPTS, formats)]
    alone = [engine.start(p, params).run().token_ids for p, params in requests]
    generations = [engine.start(p, params) for p, params in requests]
    while any(not g.finished for g in generations):
        engine.batch_stepper.step([g for g in generations if not g.finished])
    assert [g.output().token_ids for g in generations] == alone


def test_json_object_output_parses_as_an_object(engines, tokenizer):
    for prompt in PROMPTS[:3]:
        out = engines["ngram"].generate(prompt, max_new_tokens=200, response_format={"type": "json_object"},
                                        logit_bias={EOS: 5.0})
        if out.finish_reason == "stop":  # a random model may still be inside a string at the limit
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith("{")


def test_constrained_logprobs_are_the_targets_own(engines):
    # Reported log probabilities are the target's unmasked ones, as plain decoding reports them.
    a = engines["ngram"].generate(PROMPTS[0], max_new_tokens=20, logprobs=2, response_format=FORMATS["regex"])
    b = engines["ngram"].generate(PROMPTS[0], max_new_tokens=20, logprobs=2, num_draft_tokens=0,
                                  response_format=FORMATS["regex"])
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-5)


@pytest.mark.parametrize("value,message", [
    ({"type": "regex", "regex": "[a-"}, "bad regex"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "bad json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{"}}, "json_schema needs"),
    ({"type": "json_schema"}, "json_schema needs"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "bad grammar"),
    ({"type": "choice", "choice": []}, "choice must be"),
    ({"type": "xml"}, "not one of"),
    ({"regex": "a"}, "with a \"type\""),
    ("json", "with a \"type\""),
])
def test_bad_constraints_are_refused_naming_response_format(engines, value, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        engines["ngram"].generate(PROMPTS[0], max_new_tokens=4, response_format=value)
    assert error.value.field == "response_format"


def test_a_constraint_needs_a_tokenizer(target_llama):
    with pytest.raises(InvalidRequestError, match="needs a tokenizer"):
        Engine(target_llama).generate(PROMPTS[0], max_new_tokens=4, response_format={"type": "json_object"})


def test_text_format_is_no_constraint(engines):
    plain = engines["ngram"].generate(PROMPTS[0], max_new_tokens=12)
    assert engines["ngram"].generate(PROMPTS[0], max_new_tokens=12,
                                     response_format={"type": "text"}).token_ids == plain.token_ids
