"""Load a model (and its tokenizer) from a short name, a local directory, a GGUF file or a hub id.

GGUF files are de-quantized by `transformers` on load, which is slow (about a minute for
Gemma 3 270M, half of it converting the tokenizer); the result is saved once as an ordinary
safetensors directory in the cache so that later loads take seconds.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backends.hf import HFCausalLM
from ..errors import ModelLoadError
from .cache_dir import cache_root, content_digest
from .registry import REGISTRY

log = logging.getLogger("specdec")

GGUF_MAGIC = b"GGUF"
CONVERSION_FORMAT = "1"  # bump to invalidate converted caches


@dataclass
class LoadedModel:
    model: HFCausalLM | Any  # HFCausalLM, or LlamaCppCausalLM on the llama.cpp backend
    tokenizer: Any | None  # a transformers tokenizer, or None for token-id-only directories
    source: str


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but torch sees no CUDA device on this machine")
    return resolved


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


BACKENDS = ("torch", "llama.cpp")


def load_model(spec: str | os.PathLike | None, device: torch.device, dtype: torch.dtype,
               backend: str = "torch") -> LoadedModel:
    """Resolve `spec` to a model and load it on `backend`. None means the embedded default."""
    from .registry import DEFAULT_TARGET

    spec = DEFAULT_TARGET if spec is None else str(spec)
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "llama.cpp":
        return _load_llama_cpp(spec, device)
    if spec in REGISTRY:
        directory = _converted_gguf(REGISTRY[spec].locate())
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            directory = _converted_gguf(path)
        elif path.is_dir():
            directory = path
        elif _looks_like_path(spec):
            raise ModelLoadError(f"model path {spec!r} does not exist")
        else:
            directory = None  # a hub id
    return _load_hf(spec if directory is None else str(directory), spec, device, dtype)


def _load_llama_cpp(spec: str, device: torch.device) -> LoadedModel:
    from ..backends import llama_cpp_backend, llama_cpp_split

    if device.type != "cpu":
        raise ModelLoadError("the llama.cpp backend runs on the CPU here; use --backend torch for GPUs")
    if not llama_cpp_backend.available():
        raise ModelLoadError("the llama.cpp backend needs llama-cpp-python (bash scripts/setup.sh installs it)")
    path = REGISTRY[spec].locate() if spec in REGISTRY else Path(spec).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"the llama.cpp backend needs a GGUF file or a registry name; {spec!r} is neither")
    _check_gguf(path)
    log.info("loading %s with llama.cpp", spec)
    model = llama_cpp_backend.LlamaCppCausalLM(path, name=spec, split_head=llama_cpp_split.split_head_for(path))
    return LoadedModel(model, _gguf_tokenizer(path), str(path))


def _gguf_tokenizer(gguf_path: Path) -> Any:
    """The GGUF's tokenizer as a `transformers` tokenizer, converted once and cached."""
    from transformers import AutoTokenizer

    directory = _cache_key_dir(gguf_path, "tokenizers")
    if not (directory / "tokenizer_config.json").exists():
        converted = _cache_key_dir(gguf_path, "converted")
        if (converted / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(converted)
        log.info("first use of %s: converting its tokenizer (about 30 s, once)", gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _write_directory(directory, tokenizer.save_pretrained)
    return AutoTokenizer.from_pretrained(directory)


def _write_directory(target: Path, write) -> None:
    """Fill `target` through `write(staging_dir)`, then swap it in whole: an interrupted
    conversion never leaves a half-written cache entry behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_key_dir(gguf_path: Path, kind: str) -> Path:
    return cache_root() / kind / f"{gguf_path.stem}-{CONVERSION_FORMAT}-{content_digest(gguf_path)[:20]}"


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that does not exist is a missing path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".gguf") or "\\" in spec


def _load_hf(location: str, spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    log.info("loading model %s (%s on %s)", spec, str(dtype).removeprefix("torch."), device)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {spec!r}: it is not a local file or directory, and loading it as a "
            f"Hugging Face hub id failed ({_first_line(exc)})"
        ) from exc
    except ValueError as exc:
        raise ModelLoadError(f"cannot load model {spec!r}: {_first_line(exc)}") from exc
    model.to(device)
    tokenizer = _load_tokenizer(location)
    log.info("loaded %s in %.1f s", spec, time.perf_counter() - started)
    return LoadedModel(HFCausalLM(model, spec), tokenizer, location)


def _load_tokenizer(location: str) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError):
        return None  # token-id prompts still work without a tokenizer


def _converted_gguf(gguf_path: Path) -> Path:
    """De-quantize a GGUF into a cached safetensors directory (once), and return that directory."""
    _check_gguf(gguf_path)
    target = _cache_key_dir(gguf_path, "converted")
    if (target / "config.json").exists():
        return target
    log.info("first use of %s: converting GGUF to a cached model directory %s (about a minute, once)", gguf_path.name, target)
    _write_directory(target, lambda staging: _convert(gguf_path, staging))
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    started = time.perf_counter()
    log.info("converting tokenizer (about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    log.info("de-quantizing weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF {gguf_path}: {_first_line(exc)}") from exc
    # A de-quantized GGUF model is an ordinary float model; drop the GGUF marker so it saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s in %.0f s", name, time.perf_counter() - started)


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
