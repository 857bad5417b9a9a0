"""Greedy-exactness helpers shared by the loop's and the backends' tests: prompts that exercise
the n-gram drafter (repeats) and plain text, the reference (`transformers`' own generate()),
and a run that must go its full length."""
from __future__ import annotations

import torch

PROMPTS = [
    [1, 5, 9, 33, 7, 5, 9],
    [1, 100, 101, 102, 100, 101],
    [1, 42],
    [1] + list(range(200, 240)),
    [1, 7, 7, 7, 7, 7, 7, 7, 7],
    [1, 300, 12, 300, 12, 300, 12, 300],
]

def reference_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def run(engine, prompt, n, k):
    out = engine.generate(prompt, max_new_tokens=n, num_draft_tokens=k)
    assert len(out.token_ids) == n and out.finish_reason == "length"
    return out
