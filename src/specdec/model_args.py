"""The model flags that generate, serve and bench share, and the engine they load."""
from __future__ import annotations

import argparse

DRAFTER_HELP = ("how drafts are made: a draft model, a cheaper copy of the target (self), a feature head on the "
                "target's hidden states (feature: --draft DIR from distill --method feature, else the one shipped "
                "for the target), prompt lookup (ngram), lookup else one of those (ngram+model, ngram+self, "
                "ngram+feature), or none (default: model with --draft, feature with a feature head, else "
                "ngram+self with the torch backend on CPU, else ngram)")


def add_model_args(p: argparse.ArgumentParser, several_drafters: bool = False) -> None:
    from .engine import DRAFTERS

    p.add_argument("--target", help="target model: short name, local dir, .gguf file or hub id (default: gemma-3-270m)")
    p.add_argument("--draft", help="draft model sharing the target's vocabulary: a model like --target, a directory "
                                   "made by specdec distill, or a shipped draft's name (specdec models lists them)")
    if several_drafters:
        p.add_argument("--drafter", help=f"comma-separated drafters to compare ({', '.join(DRAFTERS[:-1])}); "
                                         "default: ngram, plus model when --draft is given")
    else:
        p.add_argument("--drafter", choices=DRAFTERS, help=DRAFTER_HELP)
    p.add_argument("--self-draft", choices=["auto", "bfloat16", "int8"], default="auto",
                   help="precision of the self-draft: int8 weights (a quarter of float32's bytes) or "
                        "bfloat16; auto: int8 for a float32 target on CPU, else bfloat16")
    p.add_argument("--draft-vocab", type=int, default=32768, metavar="N",
                   help="the self-draft scores only the N most frequent tokens; 0 = all (default: 32768)")
    p.add_argument("--backend", choices=["auto", "torch", "llama.cpp"], default="auto",
                   help="torch (transformers, CPU/GPU), llama.cpp (GGUF on CPU; needs llama-cpp-python), or "
                        "auto (default): llama.cpp for a GGUF target on CPU where it is installed and no "
                        "self-draft is asked for, else torch")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, run eager transformers instead of the static-cache CUDA-graph path")
    p.add_argument("--transformers-target", dest="compact_target", action="store_false",
                   help="on CPU, run the target through transformers instead of the compact decoder "
                        "(which verifies a batch of requests in one packed pass)")


def load_engine(args: argparse.Namespace):
    from .api import load

    return load(target=args.target, draft=args.draft, drafter=args.drafter, device=args.device, dtype=args.dtype,
                self_draft=args.self_draft, draft_vocab=args.draft_vocab or None, backend=args.backend,
                cuda_graphs=args.cuda_graphs, compact_target=args.compact_target)
