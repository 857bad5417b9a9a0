"""Every bad input gets one clear error naming the problem: never a crash or a hang."""
from __future__ import annotations

import subprocess
import sys

import pytest

import specdec
from specdec import Engine, InvalidRequestError, ModelLoadError, SamplingParams, SpecDecError, VocabularyMismatchError
import tiny


@pytest.fixture(scope="module")
def engine(target_llama):
    return Engine(target_llama, drafter="ngram")


@pytest.mark.parametrize("kwargs,field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -3}, "seed"),
    ({"num_draft_tokens": -1}, "num_draft_tokens"),
    ({"num_draft_tokens": 1000}, "num_draft_tokens"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_parameters_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and field in str(err.value)


def test_empty_prompts_are_rejected(engine):
    for prompt in ([], ""):
        with pytest.raises(InvalidRequestError, match="empty"):
            engine.generate(prompt)


def test_prompt_longer_than_context_is_rejected(engine, target_llama):
    with pytest.raises(InvalidRequestError, match="context of 512"):
        engine.generate([1] * 600)
    with pytest.raises(InvalidRequestError, match="exceeds the model's context"):
        engine.generate([1] * 500, max_new_tokens=100)


def test_token_ids_out_of_range_are_rejected(engine):
    with pytest.raises(InvalidRequestError, match=r"\[0, 384\)"):
        engine.generate([1, 99999])
    with pytest.raises(InvalidRequestError):
        engine.generate([1, -2])


def test_text_prompt_or_stop_without_tokenizer_is_a_clear_error(engine):
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        engine.generate("hello")
    with pytest.raises(InvalidRequestError, match="stop strings need a tokenizer"):
        engine.generate([1, 2], stop=["x"])


def test_vocabulary_mismatch_names_both_sizes(target_llama):
    other = tiny.wrap(tiny.llama(seed=2, vocab=500), "other-vocab")
    with pytest.raises(VocabularyMismatchError, match=r"500 tokens.*384.*shared vocabulary"):
        Engine(target_llama, drafter="model", draft_model=other)


def test_missing_model_path_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        specdec.load(target=str(tmp_path / "nope"), device="cpu")
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        specdec.load(target=str(fake), device="cpu")


def test_unknown_drafter_and_model_drafter_without_draft(target_llama):
    with pytest.raises(SpecDecError, match="unknown drafter"):
        Engine(target_llama, drafter="magic")
    with pytest.raises(SpecDecError, match="needs a draft model"):
        specdec.load(target="x", drafter="model")


def test_chat_without_template_is_a_clear_error(engine):
    with pytest.raises(InvalidRequestError, match="no chat template"):
        engine.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--top-p", "2"], "top_p"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "x", "--presence-penalty", "3"], "presence_penalty"),
    (["--prompt", "x", "--logit-bias", "5:300"], "logit_bias"),
    (["--prompt", "x", "--logit-bias", "five"], "TOKEN_ID:BIAS"),
    (["--prompt", "x", "--target", "/no/such/model"], "does not exist"),
])
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(argv, message, tiny_model_dir):
    if "--target" not in argv:
        argv = argv + ["--target", str(tiny_model_dir)]
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "generate", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_vocabulary_mismatch_exits_2(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    tiny.llama(seed=2, vocab=500).save_pretrained(other)
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "generate", "--target", str(tiny_model_dir),
                           "--draft", str(other), "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "vocabulary" in proc.stderr and "Traceback" not in proc.stderr
