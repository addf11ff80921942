#!/usr/bin/env python3
"""odmoe against llama.cpp on one GGUF as the prompt grows, warm, in one run.

For each prompt length, each engine runs in a fresh process on the same fixed-seed random prompt
ids (the file already in the page cache): odmoe through `odmoe bench decode`, llama.cpp through
bench/llama_cpp_decode.py (llama-cpp-python, 2 threads, prompt in batches of 512). Reported per
length: prefill time, decode tok/s after the prompt, and peak RSS, with the ratios:

    prefill speed = llama.cpp's time / odmoe's time   (above 1: odmoe is faster)
    decode speed  = odmoe's tok/s / llama.cpp's
    memory        = odmoe's peak RSS / llama.cpp's     (below 1: odmoe uses less)

A length past the model's trained context is cut to fit it with the decoded tokens.

Needs the reference environment (scripts/setup-reference-venv.sh); run it with that Python:

    ~/.cache/odmoe/refvenv/bin/python bench/context.py MODEL.gguf [--lengths 512,2048,8192]
        [--tokens 32] [--odmoe target/release/odmoe] [--out results.json]
"""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import gguf

ROOT = Path(__file__).resolve().parent.parent


def model_facts(path):
    """(vocabulary size, trained context length) from the GGUF's metadata."""
    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    context = int(reader.fields[f"{arch}.context_length"].parts[-1][0])
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return len(tokens.data), context


def run_json(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--lengths", default="512,2048,8192", help="prompt lengths, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded after each prompt")
    parser.add_argument("--odmoe", type=Path, default=ROOT / "target/release/odmoe")
    parser.add_argument("--out", type=Path, help="write every raw result here as JSON")
    args = parser.parse_args()

    vocab, trained = model_facts(args.model)
    rng = random.Random(0)
    longest = max(int(n) for n in args.lengths.split(","))
    ids = [rng.randrange(100, vocab) for _ in range(longest)]
    warm(args.model)
    rows = []
    for asked in (int(n) for n in args.lengths.split(",")):
        length = min(asked, trained - args.tokens)
        prompt = ",".join(map(str, ids[:length]))
        odmoe = run_json([
            str(args.odmoe), "bench", "decode", "--model", str(args.model), "--prompt-ids", prompt,
            "--tokens", str(args.tokens), "--context-length", str(length + args.tokens), "--json",
        ])
        llama = run_json([
            sys.executable, str(ROOT / "bench/llama_cpp_decode.py"), str(args.model),
            "--prompt-ids", prompt, "--tokens", str(args.tokens),
        ])
        rows.append({"prompt_tokens": length, "odmoe": odmoe, "llama.cpp": llama})
        print(f"{length} tokens: odmoe {odmoe['ttft_s']:.2f} s, llama.cpp {llama['ttft_s']:.2f} s", file=sys.stderr)

    mib = 1 << 20
    print(f"{args.model.name}, warm, {args.tokens} tokens decoded after the prompt")
    print()
    print("| prompt | prefill odmoe | llama.cpp | speed | decode odmoe | llama.cpp | speed "
          "| peak RSS odmoe | llama.cpp | memory |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        o, l = row["odmoe"], row["llama.cpp"]
        print(
            f"| {row['prompt_tokens']} | {o['ttft_s']:.2f} s | {l['ttft_s']:.2f} s | {l['ttft_s'] / o['ttft_s']:.2f}x "
            f"| {o['decode_tok_s']:.1f} tok/s | {l['decode_tok_s']:.1f} tok/s | {o['decode_tok_s'] / l['decode_tok_s']:.2f}x "
            f"| {o['peak_rss_bytes'] / mib:.0f} MiB | {l['peak_rss_bytes'] / mib:.0f} MiB "
            f"| {o['peak_rss_bytes'] / l['peak_rss_bytes']:.2f}x |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
