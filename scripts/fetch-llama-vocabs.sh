#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary test vectors: the vocab-only GGUF files models/ggml-vocab-*.gguf
# and their .inp/.out texts and ids, which llama.cpp's tests/test-tokenizer-0 runs; and the real
# chat templates llama.cpp tests with (models/templates/*.jinja, into templates/), among them
# gpt-oss's and GLM-4.6's, which no tokenizer package carries.
#
# They come from the llama-cpp-python source package on PyPI (vendor/llama.cpp/models/), at the
# version that made the GGUF fixtures (scripts/setup-reference-venv.sh). Only those files are
# kept, in
#   ${ODMOE_LLAMA_VOCABS_DIR:-$HOME/.cache/odmoe/llama-vocabs}/
# beside a SHA256SUMS of what was extracted. The package itself (76 MB) is not kept.
#
# Uses `pip download` only (the source package, no install, no dependencies); the package is
# checked against the sha256 pinned below. Idempotent: when every file listed in SHA256SUMS is
# present and intact, nothing is fetched.
#
# Offline (the index is unreachable) it prints why and exits 0, so that set-up goes on; the tests
# that need these files then fail and say how to fetch them.
#
# Usage: scripts/fetch-llama-vocabs.sh [--force]
# Exit codes: 0 ok or skipped offline, 1 usage or local error, 3 checksum mismatch.
set -euo pipefail

PACKAGE="llama-cpp-python"
VERSION="0.3.36"
SDIST="llama_cpp_python-$VERSION.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBERS="llama_cpp_python-$VERSION/vendor/llama.cpp/models"
ROOT="${ODMOE_LLAMA_VOCABS_DIR:-$HOME/.cache/odmoe/llama-vocabs}"

die() { local code="$1"; shift; echo "fetch-llama-vocabs: $*" >&2; exit "$code"; }

is_complete() {
  [ -s "$ROOT/SHA256SUMS" ] && grep -q ' templates/' "$ROOT/SHA256SUMS" \
    && (cd "$ROOT" && sha256sum --quiet --check SHA256SUMS >/dev/null 2>&1)
}

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die 1 "unknown argument: $arg" ;;
  esac
done

if [ "$force" = 0 ] && is_complete; then
  echo "fetch-llama-vocabs: up to date ($ROOT)"
  exit 0
fi

command -v sha256sum >/dev/null 2>&1 || die 1 "sha256sum not found on PATH"
# pip from the tests' virtual environment (scripts/setup.sh makes it), else the system's.
testvenv="${ODMOE_TEST_VENV:-$HOME/.cache/odmoe/testvenv}"
if [ -x "$testvenv/bin/pip" ]; then
  pip=("$testvenv/bin/pip")
elif python3 -m pip --version >/dev/null 2>&1; then
  pip=(python3 -m pip)
else
  die 1 "no pip found (neither $testvenv/bin/pip nor python3 -m pip)"
fi

mkdir -p "$ROOT"
# The staging directory sits inside $ROOT so that the final moves are renames on one filesystem.
work="$(mktemp -d "$ROOT/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch-llama-vocabs: pip download $PACKAGE==$VERSION (source package, 76 MB)"
# --no-binary for this package only: its build dependencies may come as wheels, which pip needs
# to read the package's metadata.
if ! "${pip[@]}" download --quiet --no-deps --no-binary "$PACKAGE" --dest "$work" \
      --timeout 60 --retries 1 "$PACKAGE==$VERSION" >"$work/pip.log" 2>&1; then
  tail -n 4 "$work/pip.log" >&2 || true
  echo "fetch-llama-vocabs: SKIPPED: could not download $PACKAGE==$VERSION from the package index" \
       "(offline, or the index is unreachable). Nothing was changed under $ROOT. The llama.cpp" \
       "vocabulary tests (engine/tests/llama_vocabs.rs) fail until this script has run." >&2
  exit 0
fi
[ -f "$work/$SDIST" ] || die 1 "pip download produced no $SDIST"
got="$(sha256sum "$work/$SDIST" | cut -d' ' -f1)"
[ "$got" = "$SDIST_SHA256" ] \
  || die 3 "$SDIST sha256 mismatch: expected $SDIST_SHA256, got $got. Nothing was changed under $ROOT."

tar -xzmf "$work/$SDIST" -C "$work" --wildcards "$MEMBERS/ggml-vocab-*" "$MEMBERS/templates/*.jinja" \
  || die 1 "$SDIST: could not extract $MEMBERS/ggml-vocab-* and $MEMBERS/templates/*.jinja"
rm -f "$work/$SDIST"
stage="$work/$MEMBERS"
(cd "$stage" && sha256sum ggml-vocab-* templates/*.jinja >SHA256SUMS)
count="$(wc -l <"$stage/SHA256SUMS")"

# rename(2) of each file, SHA256SUMS last: a reader that trusts SHA256SUMS sees complete files.
for f in "$stage"/ggml-vocab-*; do mv -f "$f" "$ROOT/"; done
mkdir -p "$ROOT/templates"
for f in "$stage"/templates/*.jinja; do mv -f "$f" "$ROOT/templates/"; done
mv -f "$stage/SHA256SUMS" "$ROOT/SHA256SUMS"
is_complete || die 1 "files in $ROOT do not match their SHA256SUMS after the move"
echo "fetch-llama-vocabs: ok, $count files ($ROOT)"
