#!/usr/bin/env bash
# The soak, a slow check kept out of scripts/test.sh: odmoed for an hour under a memory cgroup
# with clients coming and going and the memory-pressure level moving; resident memory sampled
# every 10 s. Needs root for the cgroup (it runs without a limit otherwise, and says so).
#
#   scripts/soak.sh                   one hour
#   ODMOE_SOAK_SECS=300 scripts/soak.sh    five minutes
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
ODMOE_SOAK_SECS="${ODMOE_SOAK_SECS:-3600}" \
  cargo test -p odmoe-e2e --test soak -- --ignored --nocapture
