#!/usr/bin/env bash
# Expert prediction and eviction figures for the README, on the committed fixtures (tiny random
# models): traces of bench/prompts/train.txt and heldout.txt, the shadow predictor trained on the
# first, recall of both predictors on the second, replays against the Belady bound, and live decode
# with prefetch off and on. Usage: bench/predictor.sh [OUT_DIR]   (run from the repository root)
set -euo pipefail

out=${1:-/var/tmp/odmoe-predictor}
odmoe=${ODMOE:-target/release/odmoe}
mkdir -p "$out"
[ -x "$odmoe" ] || cargo build --release -p odmoe-cli

for m in qwen2_moe qwen3_moe mixtral; do
    fixture=tests/fixtures/$m
    for set in train heldout; do
        "$odmoe" trace record --model "$fixture" --prompts "bench/prompts/$set.txt" \
            --out "$out/$m-$set.safetensors" --hidden --max-tokens 32
    done
    "$odmoe" predictor train "$out/$m-train.safetensors" --depth 4 \
        --out "$out/$m-shadow.safetensors"
    echo "## $m"
    "$odmoe" predictor eval "$out/$m-heldout.safetensors" --predictor lookahead \
        --model "$fixture" --depth 4
    "$odmoe" predictor eval "$out/$m-heldout.safetensors" --predictor shadow \
        --weights "$out/$m-shadow.safetensors" --depth 4
    "$odmoe" trace replay "$out/$m-heldout.safetensors" --sweep 10,25,50 \
        --policy lru,lfuda,belady --prefetch none,lookahead,shadow,oracle --depth 1 \
        --model "$fixture" --weights "$out/$m-shadow.safetensors"
    "$odmoe" convert "$fixture" "$out/$m.odmoe" > /dev/null
    for budget in 25% 50%; do
        "$odmoe" predictor bench --model "$out/$m.odmoe" --expert-budget "$budget" \
            --prompts bench/prompts/heldout.txt --max-tokens 64 --rounds 5 \
            --prefetch lookahead,shadow --weights "$out/$m-shadow.safetensors"
    done
done
