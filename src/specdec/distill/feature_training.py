"""Train a feature head (draft_models/feature_head.py) on the target's own hidden states.

The target reads each training sequence once (a prefill on whatever backend it runs, llama.cpp
included, so the head learns the very features it will be fed) and keeps its final hidden
states. The head then learns, at every position at once, to predict the next position's
feature and the target's next-token distribution over the head's tokens from it.

Training-time test (EAGLE-3): a drafted token k steps out is predicted from k - 1 of the head's
own predictions, never seen in teacher-forced training. So each step also rolls out: depth d
feeds, at every position, the depth d - 1 prediction of that position's feature instead of the
target's, and its loss is weighted `depth_decay ** d`. (Approximation: a position's attention
context at depth d holds depth-d entries too, not the target-fed entries the drafter keeps.)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..backends.base import CausalLM
from ..backends.features import ExposesFeatures
from ..draft_models.feature_head import (
    FeatureHead,
    feature_loss,
    one_layer_config,
    save_feature_head,
    target_text_config,
    teacher_of,
)
from ..errors import SpecDecError

log = logging.getLogger("specdec")

CHECKPOINT_FILE = "feature_checkpoint.pt"


@dataclass
class FeatureTrainingConfig:
    steps: int = 1000
    batch_size: int = 4
    depth: int = 3  # roll-out depth of the training-time test
    depth_decay: float = 0.8
    learning_rate: float = 1e-3
    checkpoint_every: int = 200
    seed: int = 0
    storage: str = "bfloat16"
    progress: bool = True


@dataclass
class FeatureTrainingResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    agreement: list[float] = field(default_factory=list)  # top-1 agreement with the target per depth, last steps


def collect_features(target: CausalLM, sequences: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """The target's final hidden states [n, seq_len, h] (float16) over each training sequence."""
    if not isinstance(target, ExposesFeatures):
        raise SpecDecError(f"target {target.name!r} does not expose its hidden states on this backend")
    out = torch.empty(*sequences.shape, target.feature_size, dtype=torch.float16)
    for i in tqdm(range(sequences.shape[0]), desc="target features", unit="seq", disable=not progress):
        cache = target.new_cache()
        try:
            target.keep_features(cache)
            target.prefill(sequences[i], cache)
            out[i] = target.features(cache, 0, sequences.shape[1]).to("cpu", torch.float16)
        finally:
            target.release(cache)
    return out


def train_feature_head(target: CausalLM, sequences: torch.Tensor, features: torch.Tensor, token_map: torch.Tensor,
                       out: Path, config: FeatureTrainingConfig, identity: dict[str, Any],
                       details: dict[str, Any], resume: bool = False) -> FeatureTrainingResult:
    """Train on `sequences` [n, seq_len] and their target `features` [n, seq_len, h]; save in `out`."""
    torch.manual_seed(config.seed)
    device = target.device  # llama.cpp's: the CPU
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    head = FeatureHead(one_layer_config(target_text_config(target))).float().to(device).train()
    # (clones: a backend may hand out inference-mode tensors, which autograd must not see)
    head_rows = target.head_rows(token_map.to(device)).float().to(device).clone()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    start_step = 0
    checkpoint_path = out / CHECKPOINT_FILE
    first_loss = None
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)
        first_loss = state.get("first_loss")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        log.info("resuming from step %d of %d (%s)", start_step, config.steps, checkpoint_path)
    generator = torch.Generator().manual_seed(config.seed + start_step)
    warmup = max(1, config.steps // 20)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))  # noqa: E731
    losses: list[float] = []
    agreements: list[list[float]] = []
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, desc="feature head", unit="step", disable=not config.progress)
    out.mkdir(parents=True, exist_ok=True)
    for step in range(start_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * schedule(step)
        rows = torch.randint(sequences.shape[0], (config.batch_size,), generator=generator)
        tokens, feats = sequences[rows].to(device), features[rows].to(device).float()
        batch, length = tokens.shape
        embeddings = target.input_embeddings(tokens[:, 1:].reshape(-1)).float().to(device)
        embeddings = embeddings.view(batch, length - 1, -1).clone()
        inputs, wanted = feats[:, :-1], feats[:, 1:]
        teacher = teacher_of(wanted, head_rows)
        loss = torch.zeros((), device=device)
        agreement = []
        for depth in range(config.depth):
            predicted = head(embeddings, inputs)  # [:, i] predicts f_{i+1}
            depth_loss, agree = feature_loss(predicted, wanted, teacher, head_rows)
            loss = loss + config.depth_decay ** depth * depth_loss
            agreement.append(float(agree))
            # The next depth reads, at position i, this depth's prediction of f_i.
            inputs = torch.cat([feats[:, :1], predicted[:, :-1]], dim=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        agreements.append(agreement)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", top1="/".join(f"{a:.2f}" for a in agreement))
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _checkpoint(checkpoint_path, {"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                          "step": done, "first_loss": first_loss if first_loss is not None else losses[0]})
    bar.close()
    recent = agreements[-50:]
    mean_agreement = [sum(a[d] for a in recent) / len(recent) for d in range(config.depth)] if recent else []
    if first_loss is None and losses:
        first_loss = losses[0]
    save_feature_head(out, head.eval(), token_map, identity,
                      {**details, "training": {"steps": config.steps, "depth": config.depth,
                                               "batch_size": config.batch_size, "first_loss": first_loss,
                                               "last_loss": losses[-1] if losses else None,
                                               "top1_agreement_per_depth": [round(a, 4) for a in mean_agreement]}},
                      storage=config.storage)
    checkpoint_path.unlink(missing_ok=True)  # the head is saved: nothing left to resume
    return FeatureTrainingResult(config.steps - start_step, time.perf_counter() - started,
                                 first_loss if first_loss is not None else float("nan"),
                                 losses[-1] if losses else float("nan"), mean_agreement)


def _checkpoint(path: Path, state: dict[str, Any]) -> None:
    staging = path.with_name(path.name + ".tmp")
    torch.save(state, staging)
    staging.replace(path)  # a run stopped mid-write leaves the last whole checkpoint
