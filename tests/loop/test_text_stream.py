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
    # Ended by length, no EOS or stop string cut a step short: every accepted draft was emitted.
    assert out.finish_reason == "length"
    assert out.provenance.count("draft") == out.stats.accepted_tokens > 0


@pytest.mark.parametrize("seed", range(6))
def test_incremental_text_equals_decoding_everything_at_once(seed):
    # Random tokens (byte fragments included) pushed in random chunks: the stream's text after
    # every push is exactly the tokenizer's decode of all tokens so far.
    import random

    tok = tiny.tokenizer()
    rng = random.Random(seed)
    ids = [rng.randrange(3, tiny.VOCAB) for _ in range(300)]
    stream = TextStream(tok)
    emitted, pos = "", 0
    while pos < len(ids):
        chunk = ids[pos : pos + rng.randint(1, 6)]
        pos += len(chunk)
        emitted += stream.push(chunk)[0]
        assert stream.text == tok.decode(ids[:pos], skip_special_tokens=True)
    assert emitted + stream.finish() == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_incremental_text_equals_whole_decoding_with_the_default_tokenizer():
    # SentencePiece-style decoding (leading spaces, byte fallback) over real text and over random ids.
    import random

    from specdec.loading.loader import load_model
    import torch

    tok = load_model(None, torch.device("cpu"), torch.float32).tokenizer
    rng = random.Random(0)
    real = tok("Ünïcödé, emoji 🙂 and  double  spaces:\n\tdef f(x): return x ** 2  # café",
               add_special_tokens=False)["input_ids"]
    for ids in (real, [rng.randrange(len(tok)) for _ in range(400)]):
        stream = TextStream(tok)
        pos = 0
        while pos < len(ids):
            step = rng.randint(1, 5)
            stream.push(ids[pos : pos + step])
            pos += step
            assert stream.text == tok.decode(ids[:pos], skip_special_tokens=True)
