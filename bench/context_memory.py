#!/usr/bin/env python3
"""Memory against context length: does a long prompt take memory like its KV cache, or faster?

Builds a tiny model with 65,536 positions (the committed qwen3_moe fixture, hidden 64, with its
config's max_position_embeddings raised; weights unchanged), prefills fixed-seed random prompts of
8K, 16K, 32K and 64K tokens (65,535: one position is left for the token decoded) with
`odmoe bench decode` (one process each, the ids through a file), and prints peak RSS minus that of
a 16-token prompt (the weights and the runtime) next to the KV cache's own bytes (`odmoe
inspect`'s bytes per token for the cache kept, times the length). The growth is linear when the
ratio stays flat.

    python3 bench/context_memory.py [--odmoe target/release/odmoe] [--lengths 8192,16384,32768,65535]
                                    [--kv-cache f16|q8_0|f32]
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/qwen3_moe"
POSITIONS = 65536


def run_json(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--odmoe", type=Path, default=ROOT / "target/release/odmoe")
    parser.add_argument("--lengths", default="8192,16384,32768,65535")
    parser.add_argument("--kv-cache", choices=["f16", "q8_0", "f32"], default="f16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="odmoe-context-") as work:
        model = Path(work) / "qwen3_moe-64k"
        shutil.copytree(FIXTURE, model)
        config = json.loads((model / "config.json").read_text())
        config["max_position_embeddings"] = POSITIONS
        (model / "config.json").write_text(json.dumps(config))
        vocab = config["vocab_size"]
        inspection = run_json([str(args.odmoe), "inspect", str(model), "--json"])
        per_token = inspection[f"kv_cache_bytes_per_token_{args.kv_cache}"]
        rng = random.Random(0)

        def peak(length):
            ids = Path(work) / "prompt.ids"
            ids.write_text(",".join(str(rng.randrange(vocab)) for _ in range(length)))
            result = run_json([
                str(args.odmoe), "bench", "decode", "--model", str(model), "--prompt-ids", f"@{ids}",
                "--tokens", "1", "--kv-cache", args.kv_cache, "--json",
            ])
            return result["peak_rss_bytes"], result["ttft_s"]

        base, _ = peak(16)
        mib = 1 << 20
        print(f"qwen3_moe fixture with {POSITIONS} positions; peak RSS of a 16-token prompt {base / mib:.1f} MiB")
        print()
        print(f"| prompt | first token | peak RSS over the 16-token run | KV cache ({args.kv_cache}) | ratio |")
        print("|---:|---:|---:|---:|---:|")
        for length in (int(n) for n in args.lengths.split(",")):
            rss, seconds = peak(length)
            kv = per_token * length
            print(f"| {length} | {seconds:.1f} s | {(rss - base) / mib:.1f} MiB | {kv / mib:.1f} MiB | {(rss - base) / kv:.2f} |")


if __name__ == "__main__":
    main()
