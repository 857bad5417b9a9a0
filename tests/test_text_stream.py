"""Streaming text, stop strings and provenance."""
from __future__ import annotations

import pytest

import specdec
from specdec.text_stream import TextStream
import tiny


@pytest.fixture(scope="module")
def text_engine(tiny_model_dir):
    return specdec.load(target=str(tiny_model_dir), device="cpu")


def test_streamed_text_equals_generated_text(text_engine):
    prompt = "the quick brown fox"
    full = text_engine.generate(prompt, max_new_tokens=40)
    assert "".join(text_engine.stream(prompt, max_new_tokens=40)) == full.text
    assert full.text == text_engine.decode(full.token_ids)


def test_stop_string_truncates_text_and_tokens(text_engine):
    prompt = "the quick brown fox"
    full = text_engine.generate(prompt, max_new_tokens=40).text
    stop = full[10:13]
    assert stop.strip(), "need a visible stop string from the generated text"
    out = text_engine.generate(prompt, max_new_tokens=40, stop=[stop])
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"
    assert stop in text_engine.decode(out.token_ids) and stop not in text_engine.decode(out.token_ids[:-1])
    assert "".join(text_engine.stream(prompt, max_new_tokens=40, stop=[stop])) == out.text


def test_text_stream_holds_back_a_possible_stop_prefix():
    tok = tiny.tokenizer()
    ids = tok("the lazy dog", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=("lazy cat",))
    emitted = "".join(stream.push([i])[0] for i in ids)
    emitted += stream.finish()
    assert emitted == "the lazy dog"


def test_provenance_marks_every_token(text_engine):
    out = text_engine.generate("the quick brown fox jumps over the lazy dog the quick", max_new_tokens=30)
    assert len(out.provenance) == len(out.token_ids)
    assert out.provenance.count("draft") == out.stats.accepted_tokens or out.finish_reason == "stop"
