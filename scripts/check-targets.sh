#!/usr/bin/env bash
# Compile-checks odmoe for the targets this machine cannot run: Apple Silicon
# (aarch64-apple-darwin, with and without the `metal` feature) and aarch64 Linux. Every crate,
# tests and benches included, with warnings as errors.
#
# Rust's standard library is built for those targets from source (-Zbuild-std), which needs a
# nightly toolchain and the library's sources of the same version. Both come without touching
# the system: the nightly this machine's image carries, and Debian's `rust-src` package of that
# version, fetched with a private apt state and unpacked under ~/.cache/odmoe. When either
# cannot be had (no nightly, the package registry unreachable, versions drifted apart), the
# script says exactly why and exits 0 without checking, as the demo does offline.
#
# Usage: scripts/check-targets.sh [TARGET ...]   (default: every target below)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}/odmoe"
skip() {
  echo "check-targets: SKIPPED, nothing was checked: $*" >&2
  exit 0
}

# The nightly toolchain, and the version of its standard library.
nightly=$(rustup toolchain list 2>/dev/null | awk '/^nightly/ {print $1; exit}')
[ -n "$nightly" ] || skip "no nightly toolchain (rustup toolchain list shows none)"
sysroot=$(rustc "+$nightly" --print sysroot)
release=$(rustc "+$nightly" -V | sed -E 's/^rustc ([0-9]+\.[0-9]+)\..*/\1/')
library="$sysroot/lib/rustlib/src/rust/library"

# The library's sources: Debian's rust-src of the same major.minor version.
if [ ! -f "$library/std/Cargo.toml" ]; then
  src="$cache/rust-src"
  if [ ! -f "$src/library/std/Cargo.toml" ]; then
    command -v apt-get >/dev/null || skip "no apt-get to fetch Debian's rust-src $release"
    apt="$cache/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
      >"$apt/sources.list"
    options=(-o "Dir::State::Lists=$apt/lists" -o "Dir::Etc::SourceList=$apt/sources.list"
      -o Dir::Etc::SourceParts=/dev/null -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1
      -o APT::Sandbox::User=root)
    apt-get "${options[@]}" update >/dev/null 2>&1 ||
      skip "Debian's package registry is unreachable (apt-get update failed)"
    candidate=$(apt-cache "${options[@]}" policy rust-src | awk '/Candidate:/ {print $2}')
    case "$candidate" in
      "$release".*) ;;
      *) skip "Debian unstable has rust-src ${candidate:-none}, the nightly is $release: versions drifted apart" ;;
    esac
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get "${options[@]}" download "rust-src=$candidate" >/dev/null 2>&1) ||
      skip "cannot download rust-src $candidate"
    dpkg -x "$work"/rust-src_*.deb "$work/x"
    rm -rf "$src.partial"
    mkdir -p "$src.partial"
    mv "$work"/x/usr/src/rustc-*/library "$src.partial/library"
    rm -rf "$src"
    mv "$src.partial" "$src"
    echo "check-targets: rust-src $candidate unpacked in $src"
  fi
  mkdir -p "$(dirname "$library")"
  ln -sfn "$src/library" "$library"
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-apple-darwin aarch64-unknown-linux-gnu)

# Its own target directory: these builds must not clobber the host's.
export CARGO_TARGET_DIR="$cache/check-targets"
check() {
  local target=$1
  shift
  echo "check-targets: $target $*"
  # -D warnings reaches only the workspace's crates: dependencies' lints are capped by cargo.
  RUSTFLAGS="-D warnings" cargo "+$nightly" check -Zbuild-std=std,panic_abort \
    --target "$target" --workspace --all-targets --quiet "$@"
}
for target in "${targets[@]}"; do
  check "$target"
  if [ "$target" = aarch64-apple-darwin ]; then
    check "$target" --features odmoed/metal,odmoe-cli/metal
  fi
done
echo "check-targets: ${targets[*]}: ok"
