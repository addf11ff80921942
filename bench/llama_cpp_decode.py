#!/usr/bin/env python3
"""llama.cpp's run of the comparison benchmark: the same measurements as `odmoe bench decode`.

Loads the GGUF with llama-cpp-python (mmap, 2 threads), prefills the prompt ids, then decodes
feeding the given ids or the greedy choice, and prints one JSON object: time to first token,
decode tok/s, bytes read from storage (/proc/self/io, which counts page-fault reads and
readahead) and peak resident memory (VmHWM, which counts mapped file pages).

Usage: llama_cpp_decode.py MODEL --prompt-ids 1,2,3 --tokens 24 [--feed-ids 4,5,...] [--threads 2]
                           [--batch 512]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import llama_cpp


def proc_field(path, key):
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(f"{key} not in {path}")


def ids(text):
    """`1,2,3`, or `@FILE` holding such a list (a long prompt's ids exceed one argument's limit)."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    return [int(x) for x in text.replace("\n", "").split(",") if x.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompt-ids", type=ids, required=True)
    parser.add_argument("--feed-ids", type=ids)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512, help="tokens per prefill batch (llama.cpp's n_batch)")
    parser.add_argument("--no-repack", action="store_true",
                        help="keep the weights as mapped (use_extra_bufts off), no repacked copy")
    parser.add_argument("--kv-cache", choices=["f16", "q8_0"], default="f16",
                        help="keys and values in f16 (llama.cpp's default) or q8_0 (with flash attention, "
                             "which a quantized V cache needs)")
    args = parser.parse_args()
    if args.no_repack:
        # Llama() takes no such argument: it starts from the library's default parameters.
        default_params = llama_cpp.llama_cpp.llama_model_default_params

        def params_without_repacking():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = params_without_repacking
    # The context holds the prompt and the reply, in whole batches.
    context = -(-(len(args.prompt_ids) + args.tokens) // args.batch) * args.batch

    started = time.perf_counter()
    llm = llama_cpp.Llama(
        args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=context,
        n_batch=args.batch,
        use_mmap=True,
        verbose=False,
        **({"type_k": llama_cpp.GGML_TYPE_Q8_0, "type_v": llama_cpp.GGML_TYPE_Q8_0, "flash_attn": True}
           if args.kv_cache == "q8_0" else {}),
    )
    load_s = time.perf_counter() - started
    read_at_start = proc_field("/proc/self/io", "read_bytes:")

    started = time.perf_counter()
    llm.eval(args.prompt_ids)
    ttft_s = time.perf_counter() - started
    read_after_prefill = proc_field("/proc/self/io", "read_bytes:")

    generated = []
    started = time.perf_counter()
    for step in range(args.tokens):
        if args.feed_ids:
            token = args.feed_ids[step]
        else:
            # Llama.scores stays zero unless every position's logits are kept; read the last one.
            last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            token = int(np.argmax(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))))
        generated.append(token)
        llm.eval([token])
    decode_s = time.perf_counter() - started
    read_at_end = proc_field("/proc/self/io", "read_bytes:")

    print(json.dumps({
        "engine": "llama.cpp",
        "model": args.model,
        "load_s": load_s,
        "prompt_tokens": len(args.prompt_ids),
        "ttft_s": ttft_s,
        "decode_tokens": args.tokens,
        "decode_s": decode_s,
        "decode_tok_s": args.tokens / decode_s,
        "bytes_read": read_at_end - read_at_start,
        "decode_bytes_read_per_token": (read_at_end - read_after_prefill) / max(args.tokens, 1),
        "peak_rss_bytes": proc_field("/proc/self/status", "VmHWM:") * 1024,
        "generated": generated,
    }))


if __name__ == "__main__":
    main()
