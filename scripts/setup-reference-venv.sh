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
# GGUF references (scripts/make_gguf_fixtures.py): gguf-py, sentencepiece (llama.cpp's converter
# imports it), and llama-cpp-python, which has no wheels on PyPI: it builds llama.cpp from source
# (~4 minutes on 2 cores). Its version pins the llama.cpp whose converter, quantizer and runtime
# make the GGUF fixtures.
"$venv/bin/pip" install --quiet "gguf==0.19.*" "sentencepiece==0.2.*"
if ! "$venv/bin/python" -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36")' 2>/dev/null; then
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$venv/bin/pip" install --quiet --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
fi
echo "reference venv ready: $venv"
