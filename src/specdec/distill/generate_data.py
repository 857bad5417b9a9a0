"""The target's own continuations as training text: exactly the contexts a draft meets when drafting."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger("specdec")

OPENING_TOKENS = 32


@torch.inference_mode()
def target_continuations(target: nn.Module, sequences: torch.Tensor, tokens: int, temperature: float = 0.8,
                         batch_size: int = 64, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """About `tokens` tokens of the target's sampled continuations of openings of `sequences`
    (the training text), as rows as long as those sequences."""
    seq_len = sequences.shape[1]
    opening = min(OPENING_TOKENS, seq_len // 2)
    new_per_row = seq_len - opening
    rows = max(1, -(-tokens // new_per_row))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(sequences.shape[0], (rows,), generator=generator)
    device = target.get_input_embeddings().weight.device
    torch.manual_seed(seed)
    out = []
    for start in tqdm(range(0, rows, batch_size), desc="target generations", unit="batch", disable=not progress):
        prompts = sequences[picks[start : start + batch_size], :opening].to(device)
        generated = target.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                    temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new_per_row,
                                    min_new_tokens=new_per_row, pad_token_id=0)
        out.append(generated[:, :seq_len].cpu())
    return torch.cat(out)


@torch.inference_mode()
def unconditional_generations(target: nn.Module, bos: int, seq_len: int, tokens: int, temperature: float = 0.8,
                              batch_size: int = 64, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """About `tokens` tokens of text the target writes from its BOS token alone: its own
    distribution over topics and registers (stories, essays, lists), which a corpus of docs and
    code lacks. Rows of `seq_len` tokens, each starting with BOS."""
    rows = max(1, -(-tokens // (seq_len - 1)))
    device = target.get_input_embeddings().weight.device
    torch.manual_seed(seed + 1)
    out = []
    for start in tqdm(range(0, rows, batch_size), desc="target text from BOS", unit="batch", disable=not progress):
        prompts = torch.full((min(batch_size, rows - start), 1), bos, dtype=torch.long, device=device)
        generated = target.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                    temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                    min_new_tokens=seq_len - 1, pad_token_id=0)
        out.append(generated[:, :seq_len].cpu())
    return torch.cat(out)


def training_generations(args: Any, model: Any, sequences: torch.Tensor, bos: int | None) -> torch.Tensor:
    """`specdec distill`'s generated training text, as its options ask: continuations of the
    text's openings (--generated-tokens) and text from BOS (--unconditional-tokens), made by the
    target in torch, kept in --generated-cache and reused from there."""
    from ..backends.hf import HFCausalLM
    from ..errors import SpecDecError

    cache = Path(args.generated_cache).expanduser() if args.generated_cache else None
    if cache is not None and cache.is_file():
        generated = torch.load(cache, weights_only=True)
        log.info("reusing %d generated sequences from %s", len(generated), cache)
    else:
        if not isinstance(model, HFCausalLM):
            raise SpecDecError("generating training text runs the target in torch: add --backend torch")
        batch = args.generation_batch_size or (512 if model.device.type == "cuda" else 8)
        parts = []
        if args.generated_tokens > 0:
            parts.append(target_continuations(model.model, sequences, args.generated_tokens,
                                              args.generation_temperature, batch_size=batch, seed=args.seed))
        if args.unconditional_tokens > 0:
            if bos is None:
                raise SpecDecError("--unconditional-tokens needs a tokenizer with a BOS token")
            parts.append(unconditional_generations(model.model, bos, sequences.shape[1], args.unconditional_tokens,
                                                   args.generation_temperature, batch_size=batch, seed=args.seed))
        generated = torch.cat(parts)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(generated, cache)
    if generated.shape[1] != sequences.shape[1]:
        raise SpecDecError(f"the generations in {cache} have another --seq-len; delete the file to regenerate")
    return generated
