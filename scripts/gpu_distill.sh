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
#
# The shipped draft (src/specdec/drafts/gemma-3-270m) was made on 2026-11-23 on an H100 with
#   build/x0..x3: the GGUF's parts 00-03; build/x4/tokenizer: tokenizer.json and
#   tokenizer_config.json of the default model's converted directory (the GPU machine's
#   transformers 5.17 converts Gemma's GGUF tokenizer into one that splits text into
#   characters; this one, from transformers 5.23, does not);
#   build/xfer: parts 04-05, gguf.sha256, data/ (../shared/data's alpaca, gsm8k-test,
#   mt-bench and humaneval files, python-docs.jsonl = pydoc topics, stdlib-sample.jsonl =
#   every 4th module of the standard library), pylib/ (gguf-py with its dist-info),
# and, after five `stash` calls, the call
#   scripts/gpu_distill.sh train --tokenizer build/keep/tokenizer --layers 4 --draft-vocab 16384 \
#     --steps 2500 --batch-size 64 --seq-len 256 --lr 6e-4 --generated-tokens 3000000 \
#     --generation-temperature 0.8 --storage int8 --device cuda --checkpoint-every 250
# (made twice: the first call reached its time limit after the checkpoint of step 2250).
set -euo pipefail
keep=build/keep
mkdir -p "$keep"
for part in build/x*/part*; do [ -e "$part" ] && cp "$part" "$keep/" || true; done
for tok in build/x*/tokenizer; do [ -d "$tok" ] && cp -r "$tok" "$keep/" || true; done
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
