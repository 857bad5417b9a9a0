"""The target's own continuations as training text: exactly the contexts a draft meets when drafting."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

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
