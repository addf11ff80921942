#!/usr/bin/env bash
# Installs what building and testing odmoe needs on a fresh Debian machine, then fetches the real
# tokenizers and llama.cpp's vocabulary test vectors the tests compare against. Idempotent; safe to
# run on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v npm >/dev/null || need_apt+=(npm)
# The daemon's end-to-end tests drive it from a real third-party msgpack-RPC client.
command -v nvim >/dev/null || need_apt+=(neovim)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# scripts/check-status-page.sh renders the daemon's status page in headless Chromium.
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need_apt[*]}; install them (apt-get install ${need_apt[*]}) or run as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }

# A small Python environment for the daemon tests' third-party clients: msgpack for the
# raw-socket client, and the official openai and anthropic packages for the HTTP APIs.
testvenv="${ODMOE_TEST_VENV:-$HOME/.cache/odmoe/testvenv}"
if ! "$testvenv/bin/python" -c 'import msgpack, openai, anthropic' 2>/dev/null; then
  python3 -m venv "$testvenv"
  "$testvenv/bin/pip" install --quiet "msgpack==1.*" "openai==3.*" "anthropic==2.*"
fi

scripts/fetch-tokenizers.sh
scripts/fetch-llama-vocabs.sh
scripts/fetch-demo-model.sh >/dev/null
