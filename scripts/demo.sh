#!/usr/bin/env bash
# Builds odmoe and generates from the committed Qwen3-MoE fixture (a tiny random model: its text
# is gibberish; it shows the pipeline working end to end). Extra arguments go to `odmoe run`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin odmoe
prompt="${ODMOE_PROMPT:-The quick brown fox}"
exec target/release/odmoe run --model tests/fixtures/qwen3_moe --prompt "$prompt" --chat \
  --max-tokens 48 --seed 1 "$@"
