"""`specdec.load`: build an engine from model names, paths or GGUF files."""
from __future__ import annotations

import logging
import os

import torch

from .engine import Engine
from .errors import SpecDecError
from .models.loading import load_model, resolve_device, resolve_dtype
from .models.self_draft import SCHEMES, build_self_draft

log = logging.getLogger("specdec")


def load(
    target: str | os.PathLike | None = None,
    draft: str | os.PathLike | None = None,
    drafter: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    self_draft: str = "bfloat16",
) -> Engine:
    """Load a target (None: the embedded default, Gemma 3 270M) and a drafter.

    drafter: "model" (needs `draft`), "self" (a `self_draft`-precision copy of the target),
    "ngram" (prompt lookup), "ngram+model" / "ngram+self" (lookup when it matches, else the
    model), "none" (plain decoding), or None: "model" when a draft is named, else "ngram".
    """
    _ensure_log_handler()
    if drafter is None:
        drafter = "model" if draft is not None else "ngram"
    uses_draft = drafter in ("model", "ngram+model")
    if uses_draft and draft is None:
        raise SpecDecError(f"drafter {drafter!r} needs a draft model (draft=... / --draft)")
    if not uses_draft and draft is not None:
        raise SpecDecError(f"a draft model was named, but drafter {drafter!r} does not use one")
    if self_draft not in SCHEMES:
        raise SpecDecError(f"unknown self-draft precision {self_draft!r}: choose one of {', '.join(SCHEMES)}")
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    loaded_target = load_model(target, resolved_device, resolved_dtype)
    if drafter in ("self", "ngram+self"):
        draft_model = build_self_draft(loaded_target.model, self_draft)
    else:
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
