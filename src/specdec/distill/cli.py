"""`specdec distill`: data -> training -> a draft directory -> a before/after table."""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

log = logging.getLogger("specdec")


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a small draft model that fits the target and your text",
                       description="Distil a shallow draft from the target on your text (KL to the target's "
                                   "next-token distributions, teacher-forced), then measure it on held-out text.")
    p.add_argument("--target", help="target model: short name, local dir, .gguf file (default: gemma-3-270m)")
    p.add_argument("--data", required=True,
                   help="training text: FILE.jsonl[.gz] (every string field), FILE.txt, a DIR of text files, or "
                        "builtin:python-docs / builtin:python-source; several joined by commas")
    p.add_argument("--out", required=True, help="directory for the draft (and checkpoints while training)")
    p.add_argument("--method", choices=["layers", "feature"], default="layers",
                   help="layers: a shallow copy of the target, distilled (a draft model); feature: a one-layer "
                        "feature head on the target's own hidden states (EAGLE-style; drafter 'feature')")
    p.add_argument("--depth", type=int, default=3,
                   help="feature: roll-out depth of the training-time test (default: 3)")
    p.add_argument("--backend", choices=["auto", "torch", "llama.cpp"], default="auto",
                   help="feature: the backend whose hidden states the head learns (default: the one generate picks)")
    p.add_argument("--layers", type=int, default=2, help="draft layers, initialised from the target's (default: 2)")
    p.add_argument("--shared-layers", type=int, default=0, metavar="N",
                   help="the draft's first N layers are the target's own, untrained and not stored: a deeper "
                        "draft in the same bytes (default: 0)")
    p.add_argument("--draft-vocab", type=int, default=16384, metavar="N",
                   help="the draft scores the N most frequent tokens of the training text (default: 16384)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: 5e-4)")
    p.add_argument("--max-tokens", type=int, help="use at most this many tokens of the data")
    p.add_argument("--generated-tokens", type=int, default=0, metavar="N",
                   help="also train on about N tokens of the target's own sampled continuations (default: 0)")
    p.add_argument("--unconditional-tokens", type=int, default=0, metavar="N",
                   help="also train on about N tokens the target writes from BOS alone (default: 0)")
    p.add_argument("--generation-temperature", type=float, default=0.8)
    p.add_argument("--generation-batch-size", type=int, help="sequences generated at once (default: 512 on GPU, 8 on CPU)")
    p.add_argument("--generated-cache", metavar="FILE",
                   help="keep the target's generations in FILE and reuse them when it exists (they cost the most)")
    p.add_argument("--storage", choices=["bfloat16", "int8"], default="bfloat16",
                   help="how the draft's weights are saved: bfloat16, or int8 rows with scales (half the size)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="read the text with this tokenizer directory instead of the target's own (it must be the "
                        "same vocabulary; for a GGUF whose tokenizer this transformers version converts badly)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", help="the target's dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS")
    p.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts to evaluate on; 0 = skip (default: 8)")
    p.add_argument("--eval-tokens", type=int, default=48, help="tokens generated per evaluation prompt (default: 48)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_distill)


def _tokenizer(path: str, vocab_size: int):
    from transformers import AutoTokenizer

    from ..errors import SpecDecError

    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(path).expanduser())
    except (OSError, ValueError) as exc:
        raise SpecDecError(f"cannot load the tokenizer in {path!r}: {exc}") from None
    if len(tokenizer) > vocab_size:
        raise SpecDecError(f"the tokenizer in {path!r} has {len(tokenizer)} tokens, more than the target's {vocab_size}")
    return tokenizer


def _distill(args: argparse.Namespace) -> int:
    import torch

    from ..api import ensure_log_handler
    from ..draft_models.distilled_draft import TargetIdentity, check_shared_layers, load_distilled_draft
    from ..errors import SpecDecError
    from ..loading.loader import load_model, resolve_device, resolve_dtype
    from .corpus import build_corpus, read_documents
    from .evaluate import evaluate, format_table, held_out_prompts
    from .train import TrainingConfig, distil, token_map_from

    ensure_log_handler()
    for name in ("layers", "steps", "batch_size", "seq_len", "checkpoint_every", "depth"):
        if getattr(args, name) < 1:
            raise SpecDecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise SpecDecError(f"--lr must be positive, got {args.lr}")
    check_shared_layers(args.shared_layers, args.layers)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise SpecDecError(f"--out {str(out)!r} exists and is not a directory")
    documents = read_documents(args.data)  # before loading the model: bad data fails in a second
    device = resolve_device(args.device)
    if args.method == "feature":
        from .feature_cli import distill_feature

        return distill_feature(args, documents, device)
    loaded = load_model(args.target, device, resolve_dtype(args.dtype, device))
    target, tokenizer = loaded.model, loaded.tokenizer
    if args.tokenizer:
        tokenizer = _tokenizer(args.tokenizer, target.vocab_size)
    if tokenizer is None:
        raise SpecDecError("distillation reads text, so the target needs a tokenizer")
    if args.draft_vocab > target.vocab_size:
        raise SpecDecError(f"--draft-vocab {args.draft_vocab} is larger than the target's vocabulary "
                           f"of {target.vocab_size} tokens")
    layers = target.model.config.get_text_config().num_hidden_layers
    if args.layers > layers:
        raise SpecDecError(f"--layers {args.layers}: the target has only {layers} layers")
    corpus = build_corpus(tokenizer, documents, args.seq_len, seed=args.seed, max_tokens=args.max_tokens)
    sequences = corpus.train
    log.info("training text: %d documents, %d tokens in %d sequences; %d documents held out",
             len(documents) - len(corpus.held_out_documents), corpus.train_tokens, len(sequences),
             len(corpus.held_out_documents))
    if args.generated_tokens > 0 or args.unconditional_tokens > 0:
        from .generate_data import training_generations

        sequences = torch.cat([sequences, training_generations(args, target, sequences, tokenizer.bos_token_id)])
    token_map = token_map_from(sequences, args.draft_vocab, target.vocab_size, set(target.eos_token_ids))
    identity = TargetIdentity.of(target.model, target.vocab_size, tokenizer)
    config = TrainingConfig(layers=args.layers, shared_layers=args.shared_layers, steps=args.steps,
                            batch_size=args.batch_size, learning_rate=args.lr,
                            checkpoint_every=args.checkpoint_every, seed=args.seed, storage=args.storage)
    details = {"data": args.data, "generated_tokens": int(args.generated_tokens), "target": args.target or "default"}
    result = distil(target.model, identity, sequences, out, config, token_map, resume=args.resume, details=details)
    log.info("trained %d steps on %d tokens in %.0f s; loss %.3f -> %.3f; draft saved in %s", result.steps,
             result.tokens, result.seconds, result.first_loss, result.last_loss, out)
    prompts = held_out_prompts(corpus.held_out_documents, args.eval_prompts)
    if not prompts:
        return 0
    trained = load_distilled_draft(out, target, tokenizer)
    with tempfile.TemporaryDirectory(prefix="specdec-untrained-") as untrained_dir:
        # the starting point (the target's copied layers, untrained), for the before/after table
        distil(target.model, identity, sequences, Path(untrained_dir),
               TrainingConfig(layers=args.layers, shared_layers=args.shared_layers, steps=0, progress=False),
               token_map)
        untrained = load_distilled_draft(untrained_dir, target, tokenizer)
    rows = evaluate(target, tokenizer, {"ngram": ("ngram", None), "untrained draft": ("model", untrained),
                                        "distilled draft": ("model", trained),
                                        "ngram + distilled draft": ("ngram+model", trained)},
                    prompts, args.eval_tokens)
    table = format_table(rows)
    print(f"\nheld-out evaluation: {len(prompts)} prompts, {args.eval_tokens} tokens each, greedy, {device}\n{table}")
    (out / "evaluation.json").write_text(json.dumps({"prompts": len(prompts), "tokens": args.eval_tokens,
                                                     "device": str(device), "rows": [r.to_dict() for r in rows]},
                                                    indent=2))
    return 0
