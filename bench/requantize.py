#!/usr/bin/env python3
"""Writes a GGUF in another llama.cpp file type, through llama.cpp's own quantizer.

For benchmarks in the types users download when only one type of a model is at hand (the demo's
SmolLM2 ships as Q4_1): requantizing keeps the first type's rounding, so the file serves speed and
memory comparisons, not quality ones. Written to a temporary name and renamed when complete.

Needs the reference environment (scripts/setup-reference-venv.sh):

    ~/.cache/odmoe/refvenv/bin/python bench/requantize.py IN.gguf OUT.gguf q8_0
"""

import argparse
import ctypes
import os
import sys

import llama_cpp

# llama.cpp's LLAMA_FTYPE_MOSTLY_* values.
FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "mxfp4_moe": 38}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("type", choices=sorted(FTYPES))
    args = parser.parse_args()
    requantize(args.source, args.target, args.type)


def requantize(source, target, type):
    """Writes `target` from `source` in llama.cpp file type `type` (a key of FTYPES)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[type]
    params.nthread = 2
    params.allow_requantize = True
    partial = target + ".partial"
    rc = llama_cpp.llama_model_quantize(source.encode(), partial.encode(), ctypes.byref(params))
    if rc != 0:
        if os.path.exists(partial):
            os.remove(partial)
        sys.exit(f"llama_model_quantize failed ({rc})")
    os.replace(partial, target)

if __name__ == "__main__":
    main()
