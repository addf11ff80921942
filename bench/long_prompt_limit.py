#!/usr/bin/env python3
"""A long prompt under a memory limit: odmoe against llama.cpp on one GGUF, in one run.

Each engine runs once in a fresh memory cgroup (bench/compare.py's) after the page cache is
dropped, prefills the same fixed-seed random prompt and decodes one token: time to first token,
bytes read from disk after loading, peak RSS, the cgroup's peak and OOM kills. llama.cpp
(llama-cpp-python, 2 threads, mmap, batches of 512, no repacked copy of the weights) runs with
readahead lowered to 128 KB, its better setting under a limit; odmoe runs `odmoe bench decode`
with experts on demand under `--budget` and its prompt in slabs (`--prefill-slab`).

The limit defaults to a third of the file. odmoe's budget is what is left of the limit after its
base weights, the KV cache of the whole prompt and the slab's activations: give it. Both engines
keep keys and values as `--kv-cache` says (f16, or q8_0: 34 bytes for f16's 64).

Usage: long_prompt_limit.py MODEL.gguf --prompt-tokens 32768 --budget 128MiB [--limit GB]
                            [--prefill-slab 4096] [--kv-cache f16|q8_0] [--out results.json]
Needs root (cgroups, readahead, dropping the page cache).
"""

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from compare import GB, READAHEAD_TUNED_KB, ROOT, readahead_file, run_engine
from context import model_facts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=32768)
    parser.add_argument("--budget", required=True, help="odmoe's expert budget, with its unit")
    parser.add_argument("--limit", type=float, help="memory limit in GB (default: a third of the file)")
    parser.add_argument("--prefill-slab", type=int, default=4096)
    parser.add_argument("--kv-cache", choices=["f16", "q8_0"], default="f16")
    parser.add_argument("--odmoe", type=Path, default=ROOT / "target/release/odmoe")
    parser.add_argument("--python", default=sys.executable, help="a Python with llama-cpp-python")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    vocab, trained = model_facts(args.model)
    if args.prompt_tokens + 1 > trained:
        sys.exit(f"{args.model}: {trained} positions, not enough for {args.prompt_tokens} + 1 tokens")
    limit = int(args.limit * GB) if args.limit else args.model.stat().st_size // 3
    rng = random.Random(args.seed)
    # Through a file: a long prompt's ids exceed what one command-line argument may hold.
    prompt_file = tempfile.NamedTemporaryFile("w", suffix=".ids", delete=False)
    prompt_file.write(",".join(str(rng.randrange(vocab)) for _ in range(args.prompt_tokens)))
    prompt_file.close()
    prompt = "@" + prompt_file.name
    runs = [
        ("odmoe", [str(args.odmoe), "bench", "decode", "--model", str(args.model), "--json",
                   "--prompt-ids", prompt, "--tokens", "1", "--expert-budget", args.budget,
                   "--prefill-slab", str(args.prefill_slab), "--kv-cache", args.kv_cache], None),
        ("llama.cpp ra=128K", [args.python, str(ROOT / "bench/llama_cpp_decode.py"), str(args.model),
                               "--prompt-ids", prompt, "--tokens", "1", "--no-repack",
                               "--kv-cache", args.kv_cache], READAHEAD_TUNED_KB),
    ]
    readahead = readahead_file(args.model)
    default_ra = int(readahead.read_text())
    results = []
    try:
        for name, cmd, ra in runs:
            readahead.write_text(str(ra or default_ra))
            print(f"{name}, {args.prompt_tokens} tokens, {limit / GB:.2f} GB limit ...", file=sys.stderr, flush=True)
            results.append(dict(run_engine(name.replace(" ", "_"), cmd, limit, warm=False), name=name))
    finally:
        readahead.write_text(str(default_ra))
        os.unlink(prompt_file.name)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))

    print(f"{args.model.name}, {args.prompt_tokens}-token prompt, {args.kv_cache} KV cache, "
          f"{limit / GB:.2f} GB limit "
          f"(file {args.model.stat().st_size / GB:.2f} GB), cold page cache")
    print()
    print("| engine | first token | read | peak RSS | cgroup peak | OOM kills |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "failed" in r:
            print(f"| {r['name']} | failed: {r['failed']} | | | {fmt(r.get('cgroup_peak_bytes'))} | {r.get('oom_kills')} |")
            continue
        print(f"| {r['name']} | {r['ttft_s']:.1f} s | {fmt(r['bytes_read'])} | {fmt(r['peak_rss_bytes'])} "
              f"| {fmt(r.get('cgroup_peak_bytes'))} | {r.get('oom_kills')} |")


def fmt(n):
    return "-" if n is None else f"{n / GB:.2f} GB"


if __name__ == "__main__":
    main()
