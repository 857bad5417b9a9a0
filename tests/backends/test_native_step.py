"""The native one-token step computes what the compact decoder's PyTorch path computes."""
from __future__ import annotations

import shutil

import pytest
import torch

from specdec.backends import compact_decoder
from specdec.backends.compact_decoder import CompactDecoder
import tiny

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler for the native kernels")


def _qwen2(seed: int):
    """Qwen2: Llama's layout with biases on q, k and v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)  # zero-initialised: make them count
    return model


MODELS = {
    "llama": lambda: tiny.llama(0, dtype=torch.float32),  # SiLU
    "qwen2": lambda: _qwen2(0),  # q/k/v biases
    "gemma3": lambda: tiny.gemma3(0, dtype=torch.float32),  # tanh-GELU, q/k norms, post-norms, window of 8
}


def _int8_decoder(model) -> CompactDecoder:
    return CompactDecoder(model, "int8", torch.float32, {2}, tiny.VOCAB, int8_weights=True)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_native_step_matches_the_pytorch_path_through_rewinds(family, monkeypatch):
    monkeypatch.setattr(compact_decoder, "INITIAL_CAPACITY", 4)  # the cache grows under the native step
    decoder = _int8_decoder(MODELS[family]())
    native = decoder._one_row_step
    assert native is not None
    ids = torch.randint(3, tiny.VOCAB, (80,), generator=torch.Generator().manual_seed(3))
    ours, theirs = decoder.new_cache(), decoder.new_cache()
    decoder.prefill(ids[:5], ours)
    decoder.prefill(ids[:5], theirs)
    worst, position = 0.0, 5
    for step in range(1, 90):
        token = ids[position : position + 1]
        a = decoder.forward(token, ours, 1)
        decoder._one_row_step = None
        b = decoder.forward(token, theirs, 1)
        decoder._one_row_step = native
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
        position += 1
        if step % 7 == 0:  # a rejected draft: both caches go back two positions
            position -= 2
            decoder.rewind(ours, position)
            decoder.rewind(theirs, position)
        assert ours.length == theirs.length == position
    assert worst < 1e-5, worst


def test_native_step_serves_int8_weights_only():
    model = tiny.llama(0, dtype=torch.float32)
    assert _int8_decoder(model)._one_row_step is not None
    assert CompactDecoder(model, "f32", torch.float32, {2}, tiny.VOCAB)._one_row_step is None
    assert CompactDecoder(model, "bf16", torch.bfloat16, {2}, tiny.VOCAB)._one_row_step is None
