"""The native CPU kernels (native/*.c: few-row products, the one-row decode step, the Q8_0
head): compiled once per machine, loaded by ctypes.

Import torch before loading it: its OpenMP calls then bind to the libgomp PyTorch loaded.

It is optional. Without a C compiler, or where the build fails, the CPU paths fall back to
PyTorch's own products (cpu_matmul.py), at the speeds measured there; SPECDEC_NATIVE=0
turns it off. Build failures are logged once, with the compiler's message.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernel's OpenMP binds to PyTorch's libgomp)

from ..loading.cache_dir import cache_root

log = logging.getLogger("specdec")

SOURCES = [Path(__file__).with_name("native") / name for name in ("few_rows.c", "one_row_step.c", "q8_0_head.c",
                                                                       "q6_k_head.c")]
HEADERS = [Path(__file__).with_name("native") / "simd_common.h"]
_library: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it is off or cannot be built (logged once)."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library = _build_and_load()
                _tried = True
    return _library


def _build_and_load() -> ctypes.CDLL | None:
    if os.environ.get("SPECDEC_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: CPU few-row products use PyTorch's (slower for 2-16 rows)")
        return None
    # -march=native code runs only where it was built: the key names the CPU, not just the source.
    code = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(code + _cpu_identity()).hexdigest()[:16]
    built = cache_root() / "native" / f"few_rows-{key}.so"
    if not built.exists():
        built.parent.mkdir(parents=True, exist_ok=True)
        staging = built.with_name(f"{built.stem}.{os.getpid()}.tmp")
        command = [compiler, "-O3", "-march=native", "-fPIC", "-shared", "-o", str(staging), *map(str, SOURCES), "-lm"]
        try:
            # Without OpenMP (no libgomp to link) the kernel still builds, running on one thread.
            result = subprocess.run(command[:1] + ["-fopenmp"] + command[1:], capture_output=True, text=True,
                                    timeout=120)
            if result.returncode != 0:
                result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("building the native CPU kernels failed (%s): using PyTorch's products", exc)
            return None
        if result.returncode != 0:
            log.warning("building the native CPU kernels failed: using PyTorch's products\n%s", result.stderr[-2000:])
            staging.unlink(missing_ok=True)
            return None
        os.replace(staging, built)
    try:
        lib = ctypes.CDLL(str(built))
    except OSError as exc:
        log.warning("loading the native CPU kernels failed (%s): using PyTorch's products", exc)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.few_rows_f32.argtypes, lib.few_rows_f32.restype = [pointer] * 3 + [size] * 5, None
    lib.few_rows_i8_parallel.argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int]
    lib.few_rows_i8_parallel.restype = None
    lib.one_row_step.argtypes = [pointer, ctypes.c_int64, pointer, pointer, ctypes.c_int64]
    lib.one_row_step.restype = ctypes.c_int
    lib.q8_0_head.argtypes = [pointer, size, size, pointer, size, pointer, ctypes.c_int]
    lib.q8_0_head.restype = ctypes.c_int
    lib.q8_0_head_vectorized.argtypes, lib.q8_0_head_vectorized.restype = [], ctypes.c_int
    lib.q8_0_head_repacked_available.argtypes, lib.q8_0_head_repacked_available.restype = [], ctypes.c_int
    lib.q8_0_repack.argtypes = [pointer, size, size, pointer, pointer, ctypes.c_int]
    lib.q8_0_repack.restype = ctypes.c_int
    lib.q8_0_head_repacked.argtypes = [pointer, pointer, size, size, pointer, size, pointer, ctypes.c_int]
    lib.q8_0_head_repacked.restype = ctypes.c_int
    lib.q6_k_head.argtypes = [pointer, size, size, pointer, size, pointer, ctypes.c_int]
    lib.q6_k_head.restype = ctypes.c_int
    lib.q6_k_head_vectorized.argtypes, lib.q6_k_head_vectorized.restype = [], ctypes.c_int
    if not lib.few_rows_vectorized():
        log.info("the native CPU kernels were built without AVX2/FMA: using PyTorch's products")
        return None
    return lib


def _cpu_identity() -> bytes:
    identity = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            identity += "".join(line for line in info if line.startswith(("flags", "model name")))[:4096]
    except OSError:
        identity += platform.processor()
    return identity.encode()
