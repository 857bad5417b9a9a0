"""`specdec.load`: build an engine from model names, paths or GGUF files."""
from __future__ import annotations

import logging
import os

import torch

from .engine import Engine
from .errors import SpecDecError
from .models.loading import load_model, resolve_device, resolve_dtype

log = logging.getLogger("specdec")


def load(
    target: str | os.PathLike | None = None,
    draft: str | os.PathLike | None = None,
    drafter: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Engine:
    """Load a target (None: the embedded default, Gemma 3 270M) and a drafter.

    drafter: "model" (needs `draft`), "ngram" (prompt lookup), "none" (plain decoding), or
    None: "model" when a draft is named, else "ngram".
    """
    _ensure_log_handler()
    if drafter is None:
        drafter = "model" if draft is not None else "ngram"
    if drafter == "model" and draft is None:
        raise SpecDecError("drafter 'model' needs a draft model (draft=... / --draft)")
    if drafter != "model" and draft is not None:
        raise SpecDecError(f"a draft model was named, but drafter {drafter!r} does not use one")
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    loaded_target = load_model(target, resolved_device, resolved_dtype)
    draft_model = load_model(draft, resolved_device, resolved_dtype).model if draft is not None else None
    return Engine(loaded_target.model, loaded_target.tokenizer, drafter, draft_model)


def _ensure_log_handler() -> None:
    # Long steps (first-time GGUF conversion) must never sit silent: log to stderr unless the
    # application configured logging itself.
    logger = logging.getLogger("specdec")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("specdec: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
