#!/usr/bin/env bash
# Set up specdec in ./.venv on a fresh machine: torch pinned (on this project's machines pip
# takes the local CPU wheel) unless torch is already there, the package with its test, server,
# bench and ray extras, and llama-cpp-python from a cached wheel (built once if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${SPECDEC_VENV:-.venv}
WHEEL_CACHE=${SPECDEC_WHEEL_CACHE:-$HOME/.cache/specdec/wheels}
TORCH_VERSION=${SPECDEC_TORCH_VERSION:-2.13.0}

say() { printf 'setup: %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  # An unpinned torch pulls a multi-GB CUDA build. On a machine without a GPU take the CPU
  # build of the pinned version (this machine kind keeps it on local disk).
  say "installing torch==$TORCH_VERSION"
  pip install -q "torch==$TORCH_VERSION"
fi

say "installing specdec and its extras"
pip install -q -e ".[test,serve,bench,ray]"

if [ "${SPECDEC_SKIP_LLAMA_CPP:-0}" != "1" ] && ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  mkdir -p "$WHEEL_CACHE"
  if ! ls "$WHEEL_CACHE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python from source (about 10 minutes on 2 cores, once; cached in $WHEEL_CACHE)"
    pip wheel --no-deps -w "$WHEEL_CACHE" "llama-cpp-python==0.3.36" --progress-bar on
  fi
  say "installing llama-cpp-python from the cached wheel"
  pip install -q "$(ls -t "$WHEEL_CACHE"/llama_cpp_python-*.whl | head -n 1)"
fi
say "done: $("$VENV/bin/python" -c 'import specdec, torch, transformers; print(f"specdec {specdec.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")')"
