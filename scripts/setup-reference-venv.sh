#!/usr/bin/env bash
# Creates the Python environment used only to (re)build reference fixtures and goldens by hand.
# Tests never need it: everything it produces is committed. Idempotent.
set -euo pipefail
venv="${ODMOE_REF_VENV:-$HOME/.cache/odmoe/refvenv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --upgrade pip
# torch from PyPI is the full build (~3 GB); it runs on CPU.
"$venv/bin/pip" install --quiet \
  "torch==2.15.*" "transformers==5.23.*" "tokenizers==0.23.*" "safetensors==0.8.*" \
  "numpy" "jinja2==3.1.*" "msgpack==1.2.*"
echo "reference venv ready: $venv"
