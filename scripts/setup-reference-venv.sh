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
# The learned bound on eviction (bench/routing_ceiling.py --learned).
"$venv/bin/pip" install --quiet "scikit-learn==1.9.*"
# Built for this CPU's instructions named one by one, never "native": a native build on a CPU with
# AMX crashes in ggml_backend_amx_mul_mat on the first eval, so AMX stays off.
cpu_flags() {
  local flags="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  local have
  have=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512_vnni:AVX512_VNNI \
      avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16; do
    case "$have" in
      *" ${pair%%:*} "*) flags="$flags -DGGML_${pair#*:}=ON" ;;
      *) flags="$flags -DGGML_${pair#*:}=OFF" ;;
    esac
  done
  echo "$flags"
}
if ! "$venv/bin/python" -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36")' 2>/dev/null; then
  if [ "$(uname -m)" = x86_64 ] && [ -z "${CMAKE_ARGS:-}" ]; then
    export CMAKE_ARGS="$(cpu_flags)"
  fi
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$venv/bin/pip" install --quiet --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
fi
echo "reference venv ready: $venv"
