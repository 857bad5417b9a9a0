"""`specdec distill --method feature`: text -> the target's features -> a feature head -> a held-out table."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..backends.base import CausalLM
from ..errors import SpecDecError

log = logging.getLogger("specdec")

FEATURES_FILE = "features.pt"  # the target's features over the training text, kept for --resume


def distill_feature(args: argparse.Namespace, documents: list[str], device: torch.device) -> int:
    from ..api import resolve_backend
    from ..draft_models.feature_head import load_feature_head, target_identity
    from ..loading.loader import load_model, resolve_dtype
    from .cli import _tokenizer
    from .corpus import build_corpus
    from .evaluate import evaluate, format_table, held_out_prompts
    from .feature_training import FeatureTrainingConfig, collect_features, train_feature_head
    from .train import token_map_from

    backend = resolve_backend(args.backend, args.target, device, None)
    loaded = load_model(args.target, device, resolve_dtype(args.dtype, device), backend)
    target = feature_target(loaded.model)
    tokenizer = _tokenizer(args.tokenizer, target.vocab_size) if args.tokenizer else loaded.tokenizer
    if tokenizer is None:
        raise SpecDecError("distillation reads text, so the target needs a tokenizer")
    if args.draft_vocab > target.vocab_size:
        raise SpecDecError(f"--draft-vocab {args.draft_vocab} is larger than the target's vocabulary "
                           f"of {target.vocab_size} tokens")
    out = Path(args.out).expanduser()
    corpus = build_corpus(tokenizer, documents, args.seq_len, seed=args.seed, max_tokens=args.max_tokens)
    sequences = corpus.train
    log.info("training text: %d tokens in %d sequences; %d documents held out", corpus.train_tokens,
             len(sequences), len(corpus.held_out_documents))
    if args.generated_tokens > 0 or args.unconditional_tokens > 0:
        from .generate_data import training_generations

        sequences = torch.cat([sequences, training_generations(args, loaded.model, sequences, tokenizer.bos_token_id)])
    features_path = out / FEATURES_FILE
    features = None
    if args.resume and features_path.is_file():
        saved = torch.load(features_path, weights_only=True)
        if torch.equal(saved["sequences"], sequences):
            features = saved["features"]
            log.info("reusing the target's features from %s", features_path)
    if features is None:
        features = collect_features(target, sequences)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"sequences": sequences, "features": features}, features_path)
    token_map = token_map_from(sequences, args.draft_vocab, target.vocab_size, set(target.eos_token_ids))
    config = FeatureTrainingConfig(steps=args.steps, batch_size=args.batch_size, depth=args.depth,
                                   learning_rate=args.lr, checkpoint_every=args.checkpoint_every, seed=args.seed,
                                   storage=args.storage)
    details = {"data": args.data, "target_model": args.target or "default", "backend": backend,
               "train_tokens": int(sequences.numel())}
    result = train_feature_head(target, sequences, features, token_map, out, config,
                                target_identity(target, tokenizer), details, resume=args.resume)
    features_path.unlink(missing_ok=True)  # trained: the features were kept only for --resume
    log.info("trained %d steps in %.0f s; loss %.3f -> %.3f; top-1 agreement per depth %s; head saved in %s",
             result.steps, result.seconds, result.first_loss, result.last_loss,
             " / ".join(f"{a:.2f}" for a in result.agreement), out)
    prompts = held_out_prompts(corpus.held_out_documents, args.eval_prompts)
    if not prompts:
        return 0
    head = load_feature_head(out, target, tokenizer)
    rows = evaluate(target, tokenizer, {"ngram": ("ngram", None), "feature head": ("feature", head),
                                        "ngram + feature head": ("ngram+feature", head)},
                    prompts, args.eval_tokens)
    print(f"\nheld-out evaluation: {len(prompts)} prompts, {args.eval_tokens} tokens each, greedy, {backend}\n"
          f"{format_table(rows)}")
    (out / "evaluation.json").write_text(json.dumps({"prompts": len(prompts), "tokens": args.eval_tokens,
                                                     "backend": backend, "rows": [r.to_dict() for r in rows]},
                                                    indent=2))
    return 0


def feature_target(model: CausalLM) -> CausalLM:
    """The target as a model whose passes keep their hidden states: llama.cpp as it is, a
    transformers model on the compact decoder (on any device: training reads its features)."""
    from ..backends.compact_decoder import CompactDecoder
    from ..backends.features import ExposesFeatures
    from ..backends.hf import HFCausalLM

    if isinstance(model, ExposesFeatures):
        return model
    if isinstance(model, HFCausalLM):
        return CompactDecoder(model.model, model.name, model.dtype, set(model.eos_token_ids), model.vocab_size)
    raise SpecDecError(f"target {model.name!r} does not expose its hidden states on this backend")
