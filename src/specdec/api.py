"""`specdec.load`: build an engine from model names, paths or GGUF files."""
from __future__ import annotations

import logging
import os

import torch

from .backends.compact_decoder import compact_target_for
from .backends.graph_decoder import graph_decoder_for
from .backends.hf import HFCausalLM
from .draft_models.distilled_draft import is_distilled_draft, load_distilled_draft
from .draft_models.feature_head import is_feature_head, load_feature_head
from .draft_models.self_draft import DEFAULT_DRAFT_VOCAB, SCHEMES, self_draft_for
from .engine import Engine
from .errors import SpecDecError
from .loading.loader import load_model, resolve_device, resolve_dtype


def load(
    target: str | os.PathLike | None = None,
    draft: str | os.PathLike | None = None,
    drafter: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    self_draft: str = "auto",
    draft_vocab: int | None = DEFAULT_DRAFT_VOCAB,
    backend: str = "auto",
    cuda_graphs: bool = True,
    compact_target: bool = True,
) -> Engine:
    """Load a target (None: the embedded default, Gemma 3 270M) and a drafter.

    drafter: "model" (needs `draft`), "self" (a `self_draft`-precision copy of the target
    whose head scores the `draft_vocab` most frequent tokens; None: all of them; precision
    "auto": int8 weights for a float32 target on CPU, else bfloat16),
    "ngram" (prompt lookup), "ngram+model" / "ngram+self" (lookup when it matches, else the
    model), "none" (plain decoding), or None: "model" when a draft is named, else "ngram+self"
    for torch targets on CPU (it beat "ngram" in the project's benchmark: docs/benchmarks) and
    "ngram" elsewhere (on llama.cpp there is no self-draft; on GPU a bf16 copy costs what the
    target costs).
    backend: "torch" (transformers), "llama.cpp" (GGUF targets on CPU), or "auto": llama.cpp
    for a GGUF target (the embedded default included) on CPU where llama-cpp-python is
    installed and no self-draft is asked for, else torch (`resolve_backend`). Drafts named by
    a GGUF path load on the same backend as the target, others on torch.
    cuda_graphs: on a GPU, run supported architectures (Llama, Qwen2, Gemma 3) with a static
    KV cache and CUDA-graph steps (backends/graph_decoder.py); False keeps eager transformers.
    compact_target: on CPU, run a supported target on the compact decoder
    (backends/compact_decoder.py): the same greedy tokens as transformers on the project's
    benchmark, as fast for one request, and one packed pass for a batch of requests
    (the server's); False keeps transformers.
    """
    ensure_log_handler()
    resolved_device = resolve_device(device)
    backend = resolve_backend(backend, target, resolved_device, drafter)
    if drafter is None:
        drafter = default_drafter(draft, backend, resolved_device)
    if drafter in ("feature", "ngram+feature") and draft is None:
        draft = _shipped_feature_head(target)
    uses_draft = drafter in ("model", "ngram+model", "feature", "ngram+feature")
    if uses_draft and draft is None:
        raise SpecDecError(f"drafter {drafter!r} needs a draft model (draft=... / --draft)")
    if not uses_draft and draft is not None:
        raise SpecDecError(f"a draft model was named, but drafter {drafter!r} does not use one")
    if self_draft not in SCHEMES:
        raise SpecDecError(f"unknown self-draft precision {self_draft!r}: choose one of {', '.join(SCHEMES)}")
    if draft_vocab is not None and (isinstance(draft_vocab, bool) or not isinstance(draft_vocab, int) or draft_vocab < 1):
        raise SpecDecError(f"draft_vocab must be a positive number of tokens (or None for all), got {draft_vocab!r}")
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    draft = _shipped_draft_path(draft)
    loaded_target = load_model(target, resolved_device, resolved_dtype, backend)
    if drafter in ("self", "ngram+self"):
        if backend != "torch":
            raise SpecDecError("the self-draft is built from a torch model: use --backend torch for it")
        draft_model = self_draft_for(loaded_target.model, loaded_target.tokenizer, self_draft, draft_vocab)
    elif draft is not None and is_feature_head(draft):
        draft_model = None  # built on the target as it finally runs (below): it reads that model's features
    elif draft is not None and is_distilled_draft(draft):
        draft_model = _distilled_draft(draft, target, loaded_target, resolved_device, resolved_dtype)
    elif draft is not None:
        draft_backend = backend if str(draft).endswith(".gguf") else "torch"
        draft_model = load_model(draft, resolved_device, resolved_dtype, draft_backend).model
    else:
        draft_model = None
    target_model = loaded_target.model
    if compact_target:
        target_model = compact_target_for(target_model)
    if cuda_graphs:
        target_model = graph_decoder_for(target_model)
        draft_model = None if draft_model is None else graph_decoder_for(draft_model)
    if draft is not None and is_feature_head(draft):
        draft_model = load_feature_head(draft, target_model, loaded_target.tokenizer)
    return Engine(target_model, loaded_target.tokenizer, drafter, draft_model)


def feature_head_for(engine: Engine, target: str | os.PathLike | None):
    """The engine's feature head, else the one shipped for `target`, on the engine's target."""
    if getattr(engine.draft_model, "reads_features", False):
        return engine.draft_model
    return load_feature_head(_shipped_draft_path(_shipped_feature_head(target)), engine.target, engine.tokenizer)


def _shipped_feature_head(target) -> str:
    from .loading.registry import shipped_feature_head

    shipped = shipped_feature_head(target)
    if shipped is None:
        raise SpecDecError(f"no feature head ships for target {target!r}: train one with "
                           "specdec distill --method feature, and name it with --draft")
    return shipped.name


def _shipped_draft_path(draft):
    from .loading.registry import DRAFTS

    if draft is None or str(draft) not in DRAFTS:
        return draft
    shipped = DRAFTS[str(draft)]
    if not shipped.present():
        raise SpecDecError(f"the shipped draft {shipped.name!r} is missing from this installation ({shipped.path}); "
                           "reinstall specdec, or distil one with specdec distill")
    return shipped.path


def _distilled_draft(draft, target_spec, loaded_target, device, dtype):
    """A distilled draft runs in torch on the target's own embedding and head; a llama.cpp
    target lends them through its torch twin (same file, loaded once more in torch)."""
    host = loaded_target
    if not isinstance(loaded_target.model, HFCausalLM):
        logging.getLogger("specdec").info("the distilled draft runs in torch: loading the target's embedding there too")
        host = load_model(target_spec, device, dtype, "torch")
    return load_distilled_draft(draft, host.model, host.tokenizer or loaded_target.tokenizer)


BACKENDS = ("auto", "torch", "llama.cpp")


def resolve_backend(backend: str, target: str | os.PathLike | None, device: torch.device,
                    drafter: str | None) -> str:
    """"auto" picks llama.cpp where it runs the target (a GGUF, on CPU): by the project's
    benchmark, its n-gram speculation decodes the default model 2.4x faster than the torch
    backend's best (README, llama.cpp backend)."""
    if backend not in BACKENDS:
        raise SpecDecError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type != "cpu" or (drafter or "").endswith("self") or not _is_gguf_target(target):
        return "torch"
    from .backends import llama_cpp_backend

    if not llama_cpp_backend.available():
        logging.getLogger("specdec").info(
            "llama-cpp-python is not installed: running the GGUF target in torch (float32, ~2x slower "
            "here); scripts/setup.sh installs it")
        return "torch"
    return "llama.cpp"


def _is_gguf_target(target: str | os.PathLike | None) -> bool:
    from .loading.registry import REGISTRY

    return target is None or str(target) in REGISTRY or str(target).endswith(".gguf")


def default_drafter(draft: str | os.PathLike | None, backend: str, device: torch.device) -> str:
    if draft is not None:
        return "feature" if is_feature_head(_shipped_draft_path(draft)) else "model"
    return "ngram+self" if backend == "torch" and device.type == "cpu" else "ngram"


def ensure_log_handler() -> None:
    # Long steps (first-time GGUF conversion) must never sit silent: log to stderr unless the
    # application configured logging itself.
    logger = logging.getLogger("specdec")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("specdec: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
