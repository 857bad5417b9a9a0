"""The real embedded default (Gemma 3 270M from its PyPI package): exact against transformers."""
from __future__ import annotations

import pytest
import torch

import specdec
from specdec.kernels.cpu_matmul import set_few_row_matmul

PROMPTS = [
    "The James Webb Space Telescope is a space telescope designed to conduct infrared astronomy. "
    "Summary: The James Webb Space Telescope",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The capital of France is",
]


@pytest.mark.slow
def test_default_model_runs_on_llama_cpp_with_ngram_and_the_split_head():
    """By the benchmark, the default model's fastest CPU path (README, llama.cpp backend)."""
    pytest.importorskip("llama_cpp")
    from specdec.kernels import native_matmul

    engine = specdec.load(device="cpu")
    assert type(engine.target).__name__ == "LlamaCppCausalLM" and engine.drafter_name == "ngram"
    library = native_matmul.library()
    assert engine.target.split_head == bool(library and library.q8_0_head_vectorized())
    # asking for the self-draft keeps the torch backend, which has it
    assert specdec.load(device="cpu", drafter="ngram+self").drafter_name == "ngram+self"


@pytest.mark.slow
def test_default_model_greedy_equals_transformers_greedy_with_each_drafter():
    engine = specdec.load(device="cpu", backend="torch")
    # the default drafter on CPU with torch: lookup, else the subset-vocabulary self-draft
    assert engine.drafter_name == "ngram+self" and engine.target.vocab_size == 262144
    assert engine.draft_model.output_token_ids.shape == (32768,)
    for prompt in PROMPTS:
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        set_few_row_matmul(engine.target.model, False)  # the reference is stock transformers
        try:
            with torch.inference_mode():
                ref = engine.target.model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        finally:
            set_few_row_matmul(engine.target.model, True)
        for drafter in ("ngram+self", "ngram", "self"):
            ours = engine.with_drafter(drafter).generate(prompt, max_new_tokens=32)
            assert ours.token_ids == ref, (prompt, drafter)
            assert ours.stats.target_forward_passes <= 32


@pytest.mark.slow
def test_shipped_distilled_draft_fits_the_default_target_and_stays_exact():
    engine = specdec.load(draft="gemma-3-270m-distilled", device="cpu", backend="torch")
    assert engine.drafter_name == "model" and engine.draft_model.output_token_ids.shape == (16384,)
    plain = engine.with_drafter("none")
    accepted = drafted = 0
    for prompt in PROMPTS:
        expected = plain.generate(prompt, max_new_tokens=32).token_ids
        ours = engine.generate(prompt, max_new_tokens=32, num_draft_tokens=3)
        assert ours.token_ids == expected, prompt
        accepted, drafted = accepted + ours.stats.accepted_tokens, drafted + ours.stats.drafted_tokens
    # the benchmark measured 68 % at k=4 on its 15 prompts; an untrained 4-layer draft
    # agreed on under 5 %
    assert accepted / drafted > 0.5


@pytest.mark.slow
def test_default_model_json_extraction_validates_and_speculation_keeps_constrained_greedy_output():
    # The built-in JSON workload (bench/workloads/json.jsonl): every answer checked validates against its
    # schema; on the torch backend (exact float32 passes) speculation's tokens are constrained
    # plain decoding's. (llama.cpp's passes of several rows round differently from one-row
    # passes, so near-ties may flip there: docs/BENCHMARKS.md.)
    import json

    import jsonschema

    from specdec.bench.workloads import load_workload

    rows = load_workload("json")
    llama = specdec.load(device="cpu")
    for row in rows[::2]:  # half of them here; the benchmark runs all 12 (docs/BENCHMARKS.md)
        out = llama.generate(row.prompt, max_new_tokens=200, response_format=row.response_format)
        assert out.finish_reason == "stop", (row.id, out.text)
        jsonschema.validate(json.loads(out.text), row.response_format["json_schema"]["schema"])
    torch_engine = specdec.load(device="cpu", backend="torch")
    for row in rows[:1]:
        plain = torch_engine.generate(row.prompt, max_new_tokens=100, num_draft_tokens=0,
                                      response_format=row.response_format)
        fast = torch_engine.generate(row.prompt, max_new_tokens=100, response_format=row.response_format)
        assert fast.token_ids == plain.token_ids, row.id
        assert fast.stats.target_forward_passes < plain.stats.target_forward_passes / 2
