"""Tiny random models and a tiny tokenizer, built from configs inside the tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from specdec.backends.hf import HFCausalLM

VOCAB = 384


def llama(seed: int, vocab: int = VOCAB, layers: int = 2, hidden: int = 64, dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype).eval()
    _sharpen(model)
    return model


def gemma3(seed: int, vocab: int = VOCAB, sliding_window: int = 8, dtype=torch.float64, heads: int = 2,
           kv_heads: int = 1):
    """Gemma 3 family with a tiny sliding window, so cache rewinds cross the window edge."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads,
                              max_position_embeddings=512,
                              sliding_window=sliding_window, layer_types=["sliding_attention", "sliding_attention",
                                                                          "full_attention"],
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Gemma3ForCausalLM(config).to(dtype).eval()
    _sharpen(model)
    return model


def _sharpen(model) -> None:
    # Random init gives near-uniform logits; scale the head so greedy choices are decisive and
    # sampled text has structure (and so that argmax ties are vanishingly rare).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)


def wrap(model, name: str = "tiny") -> HFCausalLM:
    return HFCausalLM(model, name)


def tokenizer(directory: Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b\n",
              "speculative decoding drafts tokens and the target verifies them"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def hex_tokenizer() -> PreTrainedTokenizerFast:
    """Sixteen one-character tokens, 0-9a-f, ids 0-15 (a 16-token model's vocabulary), and an
    EOS past them: grammars over hex strings for the sampling law tests."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("0123456789abcdef")}, merges=[]))
    tok.decoder = decoders.ByteFallback()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def feature_head(model, copy: bool, seed: int = 0):
    """A feature head (draft_models/feature_head.py) for a tiny one-layer-or-more target.

    copy=True: its layer and final norm are the target's first layer and final norm, and fc
    passes the token embedding through: on a one-layer target it predicts the target's next
    feature closely (its cache lacks only the first token's entry), so drafts are accepted.
    copy=False: random weights, so drafts are mostly rejected."""
    from specdec.draft_models.feature_head import FeatureHead, one_layer_config

    torch.manual_seed(seed)
    config = one_layer_config(model.config.get_text_config())
    head = FeatureHead(config).to(model.dtype)
    if copy:
        hidden = config.hidden_size
        with torch.no_grad():
            head.body.layers[0].load_state_dict(model.model.layers[0].state_dict())
            head.body.norm.load_state_dict(model.model.norm.state_dict())
            head.fc.weight.zero_()
            head.fc.weight[:, :hidden] = torch.eye(hidden)
    return head.eval().requires_grad_(False)
