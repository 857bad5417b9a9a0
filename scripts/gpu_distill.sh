#!/usr/bin/env bash
# Distil the default draft (Gemma 3 270M) on a lent GPU, through the `device` tool.
#
# The target's GGUF (253 MB) is larger than what one call may carry (64 MiB), so it travels
# in parts: split it here into build/chunks/ (split -b 50000000 -d FILE build/chunks/part),
# then make one call per part with its folder (build/x0 ...) carried and `stash` as argument (the
# machine keeps build/keep/ while it stays warm: call again within 30 s), and a last call,
# with the data (build/xfer/data), gguf-py (build/xfer/pylib) and the file's digest
# (build/xfer/gguf.sha256), that assembles, checks and trains. What comes back:
# $OUT/draft, its weights split into 15 MB pieces (join them with cat).
# Usage: scripts/gpu_distill.sh stash | scripts/gpu_distill.sh train [specdec distill options]
set -euo pipefail
keep=build/keep
mkdir -p "$keep"
for part in build/x*/part*; do [ -e "$part" ] && cp "$part" "$keep/"; done
if [ "${1:-}" = "stash" ]; then ls -la "$keep"; exit 0; fi
shift || true
[ -s "$keep/gemma.gguf" ] || cat "$keep"/part* > "$keep/gemma.gguf"
echo "$(cut -d' ' -f1 build/xfer/gguf.sha256)  $keep/gemma.gguf" | sha256sum -c -
export PYTHONPATH="$PWD/src:$PWD/build/xfer/pylib"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Training writes to build/keep (kept while the machine is warm): a call cut off by its time
# limit leaves a checkpoint that the next call's --resume picks up.
status=0
timeout "${DISTILL_SECONDS:-540}" python3 -c 'import sys; from specdec.cli import main; sys.exit(main(sys.argv[1:]))' \
    distill --target "$keep/gemma.gguf" --data build/xfer/data --out "$keep/draft" \
    --generated-cache "$keep/generated.pt" --eval-prompts 0 --resume "$@" 2>&1 \
    | tr '\r' '\n' | awk '!/%\|/ || NR % 40 == 0' | tail -80 || status=$?
[ -f "$keep/draft/specdec_draft.json" ] && [ ! -f "$keep/draft/checkpoint.pt" ] || { echo "not finished: call again"; exit 1; }
python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["training"], indent=1))' \
    "$keep/draft/specdec_draft.json"
mkdir -p "$OUT/draft"
cp "$keep/draft"/*.json "$OUT/draft/"
split -b 15000000 -d "$keep/draft/model.safetensors" "$OUT/draft/model.safetensors.part"
ls -la "$OUT/draft"
