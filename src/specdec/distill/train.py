"""Teach a shallow draft the target's next-token distributions (knowledge distillation).

Teacher-forced: the target reads the training text once per batch (one parallel forward,
never a slow generation), and the draft learns to minimise KL(target || draft) over its
token map at every position. Both distributions are taken over the token map only (the
target's renormalised there), which is the part of the target a draft can ever match.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..draft_models.distilled_draft import (
    TargetIdentity,
    body_of,
    build_draft_module,
    check_shared_layers,
    initial_layers,
    save_draft,
    trainable_parameters,
    trained_state,
)
from ..errors import SpecDecError

log = logging.getLogger("specdec")

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainingConfig:
    layers: int = 2
    shared_layers: int = 0  # the draft's first layers that stay the target's own (not trained, not stored)
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 5e-4
    checkpoint_every: int = 200
    seed: int = 0
    storage: str = "bfloat16"  # how the saved weights are stored (draft_models/distilled_draft.py)
    progress: bool = True


@dataclass
class TrainingResult:
    steps: int
    tokens: int  # over all runs of this training (a resumed one included)
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)  # one per step (this run's steps only)


def token_map_from(sequences: torch.Tensor, size: int, vocab_size: int, always: set[int]) -> torch.Tensor:
    """The `size` most frequent token ids of the training sequences, plus `always` (EOS), in
    frequency order; ties and unseen ids keep id order."""
    if size < 1:
        raise SpecDecError(f"--draft-vocab must be a positive number of tokens, got {size}")
    if size > vocab_size:
        raise SpecDecError(f"--draft-vocab {size} is larger than the target's vocabulary of {vocab_size} tokens")
    counts = torch.bincount(sequences.flatten(), minlength=vocab_size)[:vocab_size]
    for token in always:
        if 0 <= token < vocab_size:
            counts[token] = counts.max() + 1  # keep: a draft that cannot propose EOS never ends
    return torch.sort(counts, descending=True, stable=True).indices[:size].clone()


def distil(target: nn.Module, identity: TargetIdentity, sequences: torch.Tensor, out: Path,
           config: TrainingConfig, token_map: torch.Tensor, resume: bool = False,
           details: dict[str, Any] | None = None) -> TrainingResult:
    """Train a draft of `config.layers` layers on `sequences` [n, seq_len] and save it in `out`."""
    device = target.get_input_embeddings().weight.device
    target.eval().requires_grad_(False)
    layer_ids = initial_layers(target.config.get_text_config().num_hidden_layers, config.layers)
    check_shared_layers(config.shared_layers, config.layers)
    draft = build_draft_module(target, layer_ids).requires_grad_(False)
    params = trainable_parameters(draft, config.shared_layers)
    # A half-precision target trains its draft under autocast with float32 master weights;
    # a float32 or float64 target trains in its own precision.
    low_precision = target.dtype in (torch.bfloat16, torch.float16)
    for p in params:
        p.data = p.data.float() if low_precision else p.data
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = _schedule(config.steps)
    start_step = 0
    earlier = {"tokens": 0, "seconds": 0.0, "first_loss": None}  # of the runs a resume continues
    checkpoint_path = out / CHECKPOINT_FILE
    if resume and checkpoint_path.exists():
        start_step, earlier = _restore(checkpoint_path, draft, optimizer, token_map, layer_ids, config.shared_layers)
        log.info("resuming from step %d of %d (%s)", start_step, config.steps, checkpoint_path)
    elif resume:
        log.info("no checkpoint in %s: starting from the target's layers", out)
    token_map = token_map.to(device)
    head_rows = _head_rows(target, token_map)
    softcap = getattr(target.config.get_text_config(), "final_logit_softcapping", None)
    generator = torch.Generator().manual_seed(config.seed)
    order = _batches(sequences.shape[0], config.batch_size, generator, skip=start_step)
    autocast = torch.autocast(device.type, dtype=target.dtype) if low_precision else contextlib.nullcontext()
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, desc="distil", unit="step", disable=not config.progress)
    draft.train()
    for step in range(start_step, config.steps):
        batch = sequences[next(order)].to(device)
        with torch.no_grad(), autocast:
            teacher = _logits(body_of(target), batch, head_rows, softcap).float().log_softmax(-1)
        with autocast:
            student = _logits(body_of(draft), batch, head_rows, softcap).float().log_softmax(-1)
        # KL(p || q) summed over the token map, averaged over positions.
        loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        if not torch.isfinite(loss):
            raise SpecDecError(f"the distillation loss became {loss.item()} at step {step}: lower --lr")
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * schedule(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens += batch.numel()
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:.0f}", refresh=False)
        bar.update(1)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _checkpoint(checkpoint_path, draft, optimizer, token_map, layer_ids, config.shared_layers, step + 1, {
                "tokens": earlier["tokens"] + tokens, "seconds": earlier["seconds"] + time.perf_counter() - started,
                "first_loss": earlier["first_loss"] if earlier["first_loss"] is not None else losses[0]})
    bar.close()
    draft.eval()
    seconds = time.perf_counter() - started
    first_loss = earlier["first_loss"] if earlier["first_loss"] is not None else (losses[0] if losses else math.nan)
    result = TrainingResult(config.steps, earlier["tokens"] + tokens, earlier["seconds"] + seconds, first_loss,
                            losses[-1] if losses else math.nan, losses)
    save_draft(out, draft, token_map.cpu(), identity, {
        "layers_from_target": layer_ids,
        "training": {"steps": config.steps, "batch_size": config.batch_size, "seq_len": int(sequences.shape[1]),
                     "learning_rate": config.learning_rate, "tokens": result.tokens,
                     "seconds": round(result.seconds, 1), "device": str(device),
                     "first_loss": result.first_loss, "last_loss": result.last_loss, **(details or {})},
    }, storage=config.storage, shared_layers=config.shared_layers)
    checkpoint_path.unlink(missing_ok=True)
    return result


def _head_rows(target: nn.Module, token_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = target.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight[token_map].detach(), None if bias is None else bias[token_map].detach()


def _logits(body: nn.Module, batch: torch.Tensor, head_rows: tuple[torch.Tensor, torch.Tensor | None],
            softcap: float | None) -> torch.Tensor:
    hidden = body(input_ids=batch, use_cache=False).last_hidden_state
    weight, bias = head_rows
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _schedule(steps: int):
    warmup = max(1, min(100, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _batches(rows: int, batch_size: int, generator: torch.Generator, skip: int):
    """Shuffled batches, epoch after epoch; `skip` batches are drawn and dropped so that a
    resumed run sees exactly the batches an uninterrupted one would have."""
    batch_size = min(batch_size, rows)
    per_epoch = rows // batch_size

    def endless():
        while True:
            permutation = torch.randperm(rows, generator=generator)
            for i in range(per_epoch):
                yield permutation[i * batch_size : (i + 1) * batch_size]

    batches = endless()
    for _ in range(skip):
        next(batches)
    return batches


def _checkpoint(path: Path, draft: nn.Module, optimizer: torch.optim.Optimizer, token_map: torch.Tensor,
                layer_ids: list[int], shared_layers: int, step: int, totals: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "layer_ids": layer_ids, "shared_layers": shared_layers, "token_map": token_map.cpu(),
             "totals": totals, "trainable": trained_state(draft, shared_layers),
             "optimizer": optimizer.state_dict()}
    staged = path.with_suffix(".tmp")
    torch.save(state, staged)
    staged.replace(path)  # a crash mid-write never leaves a torn checkpoint


def _restore(path: Path, draft: nn.Module, optimizer: torch.optim.Optimizer, token_map: torch.Tensor,
             layer_ids: list[int], shared_layers: int) -> tuple[int, dict[str, Any]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise SpecDecError(f"cannot read the checkpoint {path}: {exc}; delete it to start over") from None
    if (state["layer_ids"] != layer_ids or state.get("shared_layers", 0) != shared_layers
            or not torch.equal(state["token_map"], token_map.cpu())):
        raise SpecDecError(f"the checkpoint in {path} was made with other settings (--layers, --shared-layers, --draft-vocab or "
                           "data): use the same ones, or delete it to start over")
    body_of(draft).load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), state["totals"]
