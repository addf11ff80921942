#!/usr/bin/env bash
# The whole test suite: set-up, build (the end-to-end tests run the built binaries), tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace
# Apple Silicon and aarch64 Linux, compile-checked (skips, saying why, when the toolchain for
# them cannot be assembled here).
scripts/check-targets.sh
