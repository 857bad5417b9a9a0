#!/usr/bin/env bash
# Distil the default draft (Gemma 3 270M) on a lent GPU, through the `device` tool.
#
# The target's GGUF (253 MB) is larger than what one call may carry (64 MiB, with the working
# tree's ~25 MiB), so it travels in parts: split it here into 36 MB parts, one folder each
# (mkdir -p build/s && split -b 36000000 -d FILE build/s/part, then build/x00/part00 ...
# build/x07/part07), then make one call per part with its folder carried and `stash` as argument
# (the machine keeps build/keep/ while it stays warm: call again within 30 s), and a last call,
# carrying the last part's folder and build/xfer (the data in build/xfer/data, gguf-py in
# build/xfer/pylib and the file's digest in build/xfer/gguf.sha256), that assembles, checks and
# trains. What comes back: $OUT/draft, its weights split into 15 MB pieces (join them with cat).
# Usage: scripts/gpu_distill.sh stash | scripts/gpu_distill.sh train [specdec distill options]
#
# The shipped draft (src/specdec/drafts/gemma-3-270m) was made on 2026-11-24 on an H100 with
#   build/x00..x06: the GGUF's parts 00-06, one call each; build/x4/tokenizer: tokenizer.json and
#   tokenizer_config.json of the default model's converted directory (the GPU machine's
#   transformers 5.17 converts Gemma's GGUF tokenizer into one that splits text into
#   characters; this one, from transformers 5.23, does not), one call;
#   build/xfer: gguf.sha256, data/ (../shared/data's alpaca, gsm8k-test, mt-bench and humaneval
#   files, python-docs.jsonl = pydoc topics, stdlib-sample.jsonl = every 4th module of the
#   standard library), pylib/ (gguf-py with its dist-info),
# and, after those eight `stash` calls, the call (carrying build/x07 and build/xfer)
#   scripts/gpu_distill.sh train --tokenizer build/keep/tokenizer --layers 12 --shared-layers 8 \
#     --draft-vocab 16384 --steps 3000 --batch-size 64 --seq-len 256 --lr 6e-4 \
#     --generated-tokens 3000000 --generation-temperature 0.8 --storage int8 --device cuda \
#     --checkpoint-every 250
# (the target's generations took 192 s, training 302 s). The same session trained
# --layers 10 --shared-layers 6 (298 s); the CPU benchmark chose the 12-layer draft.
#
# The shipped feature head (src/specdec/drafts/gemma-3-270m-feature) was made on 2026-12-04 on an
# H200 the same way: build/x00..x06 one call each, then build/x07 (part 07 and tokenizer/) with
# build/xfer (data/: the four ../shared/data files; pylib/; gguf.sha256) carried by the call
#   scripts/gpu_distill.sh train --method feature --tokenizer build/keep/tokenizer \
#     --data builtin:python-docs,builtin:python-source,build/xfer/data --max-tokens 2000000 \
#     --draft-vocab 16384 --steps 2000 --batch-size 32 --seq-len 256 --lr 1e-3 --depth 3 \
#     --generated-tokens 1000000 --storage int8 --device cuda --checkpoint-every 250
# (368 s in all: 2000 steps took 75 s; the features of 11k sequences most of the rest). A second
# run adding --unconditional-tokens 2000000 (the target's text from BOS alone: prose the corpus
# lacks) spent its 570 s generating and reading 16k sequences' features (65 a second) and was cut
# off before training; with --resume a second call trains from the kept features.
# Since the shipped head joined the working tree (31 MB tracked), a call carries at most ~33 MB
# more: the GGUF travels in 30 MB parts (split -b 30000000: build/x00..x08) and the tokenizer as
# build/x08/tokenizer.tar.gz (tar czf of the tokenizer/ folder, 5.6 MB) with the last part.
set -euo pipefail
keep=build/keep
mkdir -p "$keep"
for part in build/x*/part*; do [ -e "$part" ] && cp "$part" "$keep/" || true; done
for tok in build/x*/tokenizer; do [ -d "$tok" ] && cp -r "$tok" "$keep/" || true; done
for tok in build/x*/tokenizer.tar.gz; do [ -f "$tok" ] && tar xzf "$tok" -C "$keep" || true; done
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
[ -f "$keep/draft/specdec_draft.json" ] && [ ! -f "$keep/draft/checkpoint.pt" ] && [ ! -f "$keep/draft/feature_checkpoint.pt" ] \
    || { echo "not finished: call again"; exit 1; }
python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["training"], indent=1))' \
    "$keep/draft/specdec_draft.json"
mkdir -p "$OUT/draft"
cp "$keep/draft"/*.json "$OUT/draft/"
split -b 15000000 -d "$keep/draft/model.safetensors" "$OUT/draft/model.safetensors.part"
ls -la "$OUT/draft"
