#!/usr/bin/env bash
# Fuzzing, a slow check kept out of scripts/test.sh: libFuzzer (cargo-fuzz, nightly) over the
# message decoder and the params of every method, then a protocol fuzzer from outside the
# process against a real odmoed (random, structured and mutated messages).
#
#   scripts/fuzz.sh                 a smoke run: 200,000 executions per target
#   FUZZ_RUNS=5000000 scripts/fuzz.sh    the full run (10 million over both targets)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${FUZZ_RUNS:-200000}"

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

for target in decode_message params; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus"
  echo "fuzz: $target, $runs executions"
  (cd fuzz && cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -runs="$runs" -max_len=4096 -rss_limit_mb=4096 -print_final_stats=1 2>&1) | grep -E "stat::number_of_executed_units|Done|ERROR|panicked" || true
  [ -z "$(ls -A fuzz/artifacts/"$target" 2>/dev/null)" ] || {
    echo "fuzz: $target found crashes in fuzz/artifacts/$target" >&2
    exit 1
  }
done

cargo build --workspace --bins
cargo test -p odmoe-e2e --test protocol_fuzz -- --ignored --nocapture
