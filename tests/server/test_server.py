"""`specdec serve` over loopback with the official openai client, bad inputs, load and metrics."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import re

import httpx
import openai
import pydantic
import pytest

import specdec
from prometheus_client.parser import text_string_to_metric_families

from server_util import running_server

MODEL = "tiny-model"
PROMPTS = ["the quick brown fox", "def add(a, b):", "speculative decoding drafts tokens", "the lazy dog",
           "return a + b", "the target verifies them"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server("--target", str(tiny_model_dir), "--served-model-name", MODEL,
                        "--max-concurrency", "8", "--max-queue", "64") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_stream_equals_non_stream_and_reports_usage_and_speculative(client):
    for prompt in PROMPTS[:3]:
        full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        text = full.choices[0].text
        assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
        spec = full.model_extra["speculative"]
        assert {"acceptance_rate", "mean_accepted_length", "drafted_tokens", "accepted_tokens"} <= set(spec)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        # k follows measured step times, so the draft schedule (not the text) may differ per run
        streamed = chunks[-1].model_extra["speculative"]
        assert 0 <= streamed["accepted_tokens"] <= streamed["drafted_tokens"]


def test_chat_completion_stream_and_non_stream(client):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_sampling_with_seed_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt="the quick", max_tokens=16, temperature=0.9, top_p=0.95, seed=11)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**8}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "fox " * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * (2 << 20)}, 413, None),
    ("/v1/nothing", {}, 404, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frequency_penalty": -3.0}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    # OpenAI fields this server does not do are refused by name, never silently ignored
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "surprise": 1}, 400, "surprise"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": 2},
     400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "regex", "regex": "[a-"}},
     400, "response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "response_format": "json"}, 400, "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages"),
    # limits and text that cannot become tokens
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": "s" * 257}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "num_draft_tokens": 13}, 400, "num_draft_tokens"),
    ("/v1/completions", b'{"model": "tiny-model", "prompt": "bad \\ud800 text"}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-model", "prompt": "hi", "stop": "\\udfff"}', 400, "stop"),
    ("/v1/chat/completions", b'{"model": "tiny-model", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400,
     "messages"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, client, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    after = client.completions.create(model=MODEL, prompt="the", max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length") and after.usage.completion_tokens >= 1


def test_openai_fields_at_their_inert_defaults_are_accepted(client):
    plain = client.completions.create(model=MODEL, prompt="the quick", max_tokens=8, temperature=0)
    same = client.completions.create(model=MODEL, prompt="the quick", max_tokens=8, temperature=0, presence_penalty=0,
                                     frequency_penalty=0.0, logit_bias={}, echo=False, best_of=1, user="u1")
    assert same.choices[0].text == plain.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the quick"}],
                                          max_tokens=4, temperature=0, logprobs=False,
                                          response_format={"type": "text"}, tool_choice="none")
    assert chat.choices[0].message.content is not None


def test_penalties_and_logit_bias_over_the_openai_client_act_as_in_the_engine(client, tiny_model_dir):
    engine = specdec.load(target=str(tiny_model_dir), device="cpu")
    settings = dict(presence_penalty=0.7, frequency_penalty=1.1)
    served = client.completions.create(model=MODEL, prompt="the quick", max_tokens=16, temperature=0, **settings)
    assert served.choices[0].text == engine.generate("the quick", max_new_tokens=16, **settings).text
    token = engine.encode(" fox")[-1]
    forced = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the quick"}],
                                            max_tokens=5, temperature=0, logit_bias={str(token): 100})
    assert forced.choices[0].message.content == engine.decode([token] * 5)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=150)
    member: bool


def test_schema_constrained_outputs_parse_and_validate_every_time_over_the_openai_client(client):
    # openai's own parse(): a pydantic model becomes a strict json_schema, and every answer,
    # greedy or sampled, parses back into it.
    for i, prompt in enumerate(PROMPTS):
        for temperature in (0, 1.0):
            answer = client.chat.completions.parse(
                model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=Person,
                max_tokens=120, temperature=temperature, seed=i)
            choice = answer.choices[0]
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person), choice


def test_constrained_greedy_output_is_the_same_with_and_without_speculation(client):
    strict = {**Person.model_json_schema(), "additionalProperties": False}
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": strict}}
    for prompt in PROMPTS[:3]:
        answers = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=120, temperature=0,
                                             extra_body={"response_format": schema, "num_draft_tokens": k})
                   for k in (0, None, 4)]
        texts = {a.choices[0].text for a in answers}
        assert len(texts) == 1, texts
        Person.model_validate_json(texts.pop())
        plain, spec = answers[0].model_extra["speculative"], answers[1].model_extra["speculative"]
        # the schema's keys and punctuation were drafted for free and accepted
        assert spec["accepted_tokens"] >= 8 and spec["target_forward_passes"] < plain["target_forward_passes"]
        streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=120, temperature=0, stream=True,
                                             extra_body={"response_format": schema})
        assert "".join(c.choices[0].text for c in streamed) == answers[0].choices[0].text


def test_regex_choice_and_json_object_constraints_over_the_openai_client(client):
    def ask(response_format):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the quick"}],
                                              max_tokens=60, temperature=0.8, seed=3,
                                              extra_body={"response_format": response_format})
    assert ask({"type": "choice", "choice": ["yes", "no"]}).choices[0].message.content in ("yes", "no")
    text = ask({"type": "regex", "regex": "[0-9]{3}-[a-z]{2}"}).choices[0].message.content
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", text), text
    answer = ask({"type": "json_object"}).choices[0]
    assert answer.message.content.startswith("{")
    if answer.finish_reason == "stop":
        assert isinstance(json.loads(answer.message.content), dict)


def test_n_choices_are_independent_sequences_over_the_openai_client(client):
    single = client.completions.create(model=MODEL, prompt="the quick", max_tokens=10, temperature=0)
    greedy = client.completions.create(model=MODEL, prompt="the quick", max_tokens=10, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert all(c.text == single.choices[0].text for c in greedy.choices)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens
    messages = [{"role": "user", "content": "the lazy dog"}]
    sampled = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=5,
                                             n=3)
    for i, choice in enumerate(sampled.choices):  # choice i samples with seed + i, as alone
        alone = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0,
                                               seed=5 + i)
        assert choice.message.content == alone.choices[0].message.content
    assert len({c.message.content for c in sampled.choices}) > 1
    texts, usage = {0: "", 1: ""}, None
    for chunk in client.completions.create(model=MODEL, prompt="the quick", max_tokens=12, temperature=1.0, seed=9,
                                           n=2, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
    whole = client.completions.create(model=MODEL, prompt="the quick", max_tokens=12, temperature=1.0, seed=9, n=2)
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_a_client_leaving_a_stream_of_n_choices_ends_every_choice(server):
    before = _metric(server, "specdec_cancelled_requests_total")
    # EOS banned: every choice runs until the client leaves (a sampled one could end first)
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 400, "temperature": 1.0, "n": 3, "stream": True,
            "logit_bias": {"2": -100}}
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60, json=body) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 3:
                break
    deadline = time.monotonic() + 10
    while (_metric(server, "specdec_cancelled_requests_total") < before + 3
           or httpx.get(f"{server}/health").json()["running"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server, "specdec_cancelled_requests_total") == before + 3
    assert httpx.get(f"{server}/health").json()["running"] == 0


def test_logprobs_with_speculation_over_the_openai_client(client):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and chat.model_extra["speculative"]["drafted_tokens"] >= 0
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the chosen token is the likeliest
    assert "".join(e.token for e in content).strip() == chat.choices[0].message.content.strip()
    streamed = [e for c in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                          logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # The adaptive k reads timings, so the two runs may verify in other shapes: float32 rounding.
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"num_draft_tokens": 0})
    assert [e.logprob for e in plain.choices[0].logprobs.content] == pytest.approx([e.logprob for e in content],
                                                                                    abs=1e-4)
    completion = client.completions.create(model=MODEL, prompt="the quick", max_tokens=8, temperature=0, logprobs=1)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == completion.usage.completion_tokens
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == completion.choices[0].text
    assert client.completions.create(model=MODEL, prompt="the", max_tokens=3).choices[0].logprobs is None


def test_a_tiny_temperature_is_greedy_not_a_500(client):
    greedy = client.completions.create(model=MODEL, prompt="the quick", max_tokens=12, temperature=0)
    for temperature in (1e-40, 1e-8):
        tiny_t = client.completions.create(model=MODEL, prompt="the quick", max_tokens=12, temperature=temperature,
                                           seed=3)
        assert tiny_t.choices[0].text == greedy.choices[0].text


def test_stream_options_include_usage_adds_a_last_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the quick"}],
                                                 max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_metrics_label_routes_not_raw_paths(server):
    for i in range(3):
        httpx.get(f"{server}/v1/no/such/path/{i}")
    endpoints = {s.labels["endpoint"] for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)
                 for s in f.samples if s.name == "specdec_requests_total"}
    assert "unmatched" in endpoints and not any("no/such" in e for e in endpoints), endpoints


@pytest.mark.heavy
def test_load_32_concurrent_streams_one_killed_midway(server, client):
    """32 streaming clients at once plus one that hangs up mid-stream: none lost, all correct."""
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=48, temperature=0).choices[0].text
                for p in PROMPTS}

    def stream(i: int) -> tuple[str, str, float]:
        prompt = PROMPTS[i % len(PROMPTS)]
        started = time.monotonic()
        local = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        text = "".join(c.choices[0].text for c in local.completions.create(
            model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stream=True))
        return prompt, text, time.monotonic() - started

    # Greedy, and checked to run its full length: a sampled request could reach EOS and finish
    # before the server sees the hang-up, and then nothing is cancelled.
    killed = {"model": MODEL, "prompt": "the quick", "max_tokens": 400, "temperature": 0}
    assert client.completions.create(**killed).choices[0].finish_reason == "length"

    def hang_up() -> None:
        with httpx.stream("POST", f"{server}/v1/completions", timeout=60, json={**killed, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 3:
                    return  # close the connection mid-stream

    before = _metric(server, "specdec_cancelled_requests_total")
    killer = threading.Thread(target=hang_up)
    killer.start()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(stream, range(32), timeout=240))
    killer.join(timeout=60)
    elapsed = time.monotonic() - started
    assert len(results) == 32
    for prompt, text, _ in results:
        assert text == expected[prompt]
    latencies = sorted(r[2] for r in results)
    print(f"\nload: 32 streams in {elapsed:.1f} s, p50 {latencies[15]:.2f} s, p95 {latencies[30]:.2f} s, 0 errors")
    deadline = time.monotonic() + 10
    while _metric(server, "specdec_cancelled_requests_total") <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server, "specdec_cancelled_requests_total") == before + 1
    assert httpx.get(f"{server}/health").json()["running"] == 0


def test_metrics_parse_and_match_what_was_served(server, client):
    before = _metric(server, "specdec_generated_tokens_total")
    served = 0
    for prompt in PROMPTS[:3]:
        served += client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0).usage.completion_tokens
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
    for name in ("specdec_requests", "specdec_generated_tokens", "specdec_drafted_tokens", "specdec_accepted_tokens",
                 "specdec_acceptance_rate", "specdec_time_to_first_token_seconds", "specdec_request_latency_seconds",
                 "specdec_queue_depth"):
        assert name in families, name
    assert _metric(server, "specdec_generated_tokens_total") == before + served
    drafted = _metric(server, "specdec_drafted_tokens_total")
    accepted = _metric(server, "specdec_accepted_tokens_total")
    assert abs(_metric(server, "specdec_acceptance_rate") - (accepted / drafted if drafted else 0)) < 1e-9
    # by draft position: position 1 counts every step that drafted; the positions sum to the totals
    by_position = {(s.name, s.labels["position"]): s.value for name in ("specdec_drafted_tokens_by_position",
                                                                      "specdec_accepted_tokens_by_position")
                   for s in families[name].samples if s.name.endswith("_total")}
    assert sum(v for (n, _), v in by_position.items() if n.startswith("specdec_drafted")) == drafted
    assert sum(v for (n, _), v in by_position.items() if n.startswith("specdec_accepted")) == accepted
    drafted_at = {int(p): v for (n, p), v in by_position.items() if n.startswith("specdec_drafted")}
    assert drafted and all(drafted_at[p] >= drafted_at.get(p + 1, 0) for p in drafted_at)


def test_api_key_required_when_configured(tiny_model_dir):
    with running_server("--target", str(tiny_model_dir), "--served-model-name", MODEL, "--api-key", "s3cret") as base:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{base}/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="the", max_tokens=3, temperature=0).choices
        assert httpx.get(f"{base}/health").status_code == 200  # health stays open for probes
        assert httpx.get(f"{base}/metrics").status_code == 200  # and metrics, for scrapers
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
        assert httpx.get(f"{base}/openapi.json", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_excess_requests_get_429_when_queue_is_full(slow_model_dir):
    with running_server("--target", str(slow_model_dir), "--served-model-name", MODEL, "--max-concurrency", "1",
                        "--max-queue", "0") as base:
        body = {"model": MODEL, "prompt": "the quick", "max_tokens": 400, "temperature": 0, "stream": True,
                "num_draft_tokens": 0}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(lines)  # the first request now holds the only slot
            busy = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=30)
            assert busy.status_code == 429 and "capacity" in busy.json()["error"]["message"]
        time.sleep(0.5)
        done = httpx.post(f"{base}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
        assert done.status_code == 200


def _metric(base: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise KeyError(name)


def test_a_request_cancelled_while_its_grammar_compiles_cancels_what_it_submitted():
    # A constrained request is submitted on a worker thread (the grammar compiles there); a
    # client that leaves meanwhile must not leave its generations holding slots.
    import asyncio

    from specdec.server.app import _off_the_loop

    class Handle:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    made = [Handle(), Handle()]

    def slow_submit() -> list:
        time.sleep(0.3)
        return made

    async def leave_early() -> None:
        task = asyncio.ensure_future(_off_the_loop(slow_submit))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the thread finishes; its handles are cancelled then

    asyncio.run(leave_early())
    assert all(handle.cancelled for handle in made)
