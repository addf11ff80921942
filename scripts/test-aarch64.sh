#!/usr/bin/env bash
# Runs engine tests built for aarch64 Linux under user-mode emulation (qemu-user, whose CPU has
# NEON with dotprod), so the NEON kernels execute here: every kernel's exact block sums, the
# products' independence of thread count and batch, and the GGUF fixtures' logits against
# llama.cpp's. Slow: a cross build of the engine and its
# standard library (about 10 minutes cold on 2 cores), then emulation. Kept out of the suite.
# (Resident memory cannot be judged under emulation: qemu keeps memory for every thread the
# guest ever started, so engine/tests/expert_memory.rs runs on the host only.)
#
# Needs the toolchain of scripts/check-targets.sh, plus Debian's qemu-user and aarch64 cross
# linker (installed when missing and run as root; otherwise it says which and skips).
#
# Usage: scripts/test-aarch64.sh [TEST FILTER]   (default: the kernels' tests)
set -euo pipefail
cd "$(dirname "$0")/.."

skip() {
  echo "test-aarch64: SKIPPED, nothing was run: $*" >&2
  exit 0
}
# shellcheck source=scripts/nightly-std.sh
source scripts/nightly-std.sh

need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
[ -f /usr/aarch64-linux-gnu/lib/libc.so.6 ] || need+=(libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || skip "missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
    >/dev/null || skip "could not install ${need[*]} from Debian's registry"
fi

target=aarch64-unknown-linux-gnu
# Shared with check-targets.sh: the standard library built for the target is reused.
export CARGO_TARGET_DIR="$cache/check-targets"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
run() {
  echo "test-aarch64: $*"
  cargo "+$nightly" test -Zbuild-std=std,panic_abort --target "$target" -p odmoe-engine "$@"
}
if [ $# -gt 0 ]; then
  run --lib -- "$@"
else
  run --lib -- kernels::
  # The GGUF files' logits against llama.cpp's, through the NEON kernels.
  run --test gguf_llama_cpp -- types_of_the_kernels_stay_near_llama_cpp
fi
echo "test-aarch64: ok"
