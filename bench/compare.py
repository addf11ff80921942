#!/usr/bin/env python3
"""odmoe against llama.cpp on one GGUF, warm and under memory limits, in one run.

For each condition and engine it drops the page cache (except warm), starts the engine in a fresh
memory cgroup (v1 or v2, created and removed here), prefills the same fixed-seed random prompt
and decodes the same tokens: fixed-seed random ids (routing varies as in real text) and greedy.
llama.cpp runs through llama-cpp-python (2 threads, mmap) at the block device's default readahead
and again with readahead lowered to 128 KB (restored afterwards). odmoe runs `odmoe bench decode`
with experts on demand under a budget of the limit minus what its base model and runtime take.

Prints a markdown table (and writes every raw result as JSON with --out). Needs root.

Usage: bench/compare.py [--model M.gguf] [--limits 4,3,2] [--tokens 24] [--warm-repeats 3]
                        [--engines llama.cpp,odmoe] [--no-warm] [--limited-repeats N] [--read-rate GBPS]
                        [--out results.json]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("/var/tmp/odmoe-model/qwen3moe-bench-q8_0.gguf")
GB = 1_000_000_000
# What odmoe holds besides experts on this model: Q8_0 attention, embeddings and output head
# (0.34 GB), the KV cache, read buffers, freed memory the allocator keeps, and the binary; peak RSS
# measured 0.64-0.73 GB above a 1.33 GB budget.
ODMOE_RESERVE = 768 * 2**20
READAHEAD_TUNED_KB = 128


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout.strip()


def drop_page_cache():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk_of(path):
    """The sysfs directory of the disk holding `path` (its whole disk, not a partition)."""
    number = sh("findmnt", "-n", "-o", "MAJ:MIN", "--target", str(path))
    device = Path("/sys/dev/block") / number.strip()
    if not (device / "queue").exists():  # a partition: the settings are its disk's
        device = device.resolve().parent
    return device


def readahead_file(path):
    """The sysfs readahead setting (KB) of the disk holding `path`, which mmap faults inherit."""
    return disk_of(path) / "queue/read_ahead_kb"


class Cgroup:
    """A memory cgroup limited to `limit` bytes (None: unlimited), v2 where mounted, else v1; with
    `read_bps`, reads from disk `device` ("MAJ:MIN") are also held to that many bytes a second."""

    def __init__(self, name, limit, read_bps=None, device=None):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
        self.v2 = v2
        self.path = base / name
        self.path.mkdir()
        self.paths = [self.path]
        if limit is not None:
            (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if read_bps is not None:
            if v2:
                Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+io")
                (self.path / "io.max").write_text(f"{device} rbps={read_bps}")
            else:
                blkio = Path("/sys/fs/cgroup/blkio") / name
                blkio.mkdir()
                self.paths.append(blkio)
                (blkio / "blkio.throttle.read_bps_device").write_text(f"{device} {read_bps}")

    def wrap(self, cmd):
        joins = " && ".join(f"echo $$ > {p / 'cgroup.procs'}" for p in self.paths)
        return ["sh", "-c", f'{joins} && exec "$@"', "sh", *cmd]

    def report(self):
        if self.v2:
            peak = self.path / "memory.peak"
            events = (self.path / "memory.events").read_text()
            oom = int(dict(l.split() for l in events.splitlines()).get("oom_kill", 0))
            return {"cgroup_peak_bytes": int(peak.read_text()) if peak.exists() else None, "oom_kills": oom}
        control = dict(l.split() for l in (self.path / "memory.oom_control").read_text().splitlines())
        return {
            "cgroup_peak_bytes": int((self.path / "memory.max_usage_in_bytes").read_text()),
            "oom_kills": int(control.get("oom_kill", 0)),
        }

    def remove(self):
        for path in self.paths:
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def run_engine(name, cmd, limit, warm, read_bps=None, device=None):
    if not warm:
        drop_page_cache()
    group = Cgroup(f"odmoe-bench-{os.getpid()}-{name}", limit, read_bps, device)
    try:
        started = time.perf_counter()
        proc = subprocess.run(group.wrap(cmd), capture_output=True, text=True)
        wall = time.perf_counter() - started
        report = group.report()
    finally:
        group.remove()
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"engine": name, "failed": f"exit {proc.returncode}: {' / '.join(tail)}", **report}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(report, wall_s=wall, runner=name)
    return result


def median_run(runs):
    """The run with the median decode speed (a failed run, if any failed)."""
    failed = [r for r in runs if "failed" in r]
    if failed:
        return failed[0]
    return sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]


def fmt_bytes(n):
    return "-" if n is None else f"{n / GB:.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--odmoe", type=Path, default=ROOT / "target/release/odmoe")
    parser.add_argument("--python", default=sys.executable, help="a Python with llama-cpp-python")
    parser.add_argument("--limits", default="4,3,2", help="memory limits in GB (10^9 bytes), comma separated")
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per run")
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--feeds", default="random,greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-repeats", type=int, default=3,
                        help="runs of each engine in the warm condition; the median is reported")
    parser.add_argument("--limited-repeats", type=int, default=1,
                        help="runs of each engine under each memory limit, in turn and every other"
                             " round in reverse order; the median is reported")
    parser.add_argument("--llama-no-repack", action="store_true",
                        help="llama.cpp without its repacked copy of the weights (use_extra_bufts off):"
                             " on x86 with AVX-512 it repacks Q4_K and other types into anonymous"
                             " memory, a second copy of the weights that a memory limit kills")
    parser.add_argument("--engines", default="llama.cpp,odmoe",
                        help="engines to run, comma separated (odmoe alone: its prefetch on and off)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm, unlimited condition")
    parser.add_argument("--odmoe-args", default="", help="more arguments for odmoe's runs with prefetch on; with"
                        " --prefetch-from-trace T (a --trace-out of the same run) they prefetch"
                        " from the recording: every guess right, the most prefetch can gain")
    parser.add_argument("--read-rate", type=float,
                        help="hold the limited runs' reads from the model's disk to this many GB/s"
                             " (a cgroup's throttle): a steady disk, where this one's rate drifts by"
                             " a fifth from minute to minute; under it decode is bound by bytes read")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="print the table of an earlier run's --out file")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return

    if os.geteuid() != 0:
        sys.exit("compare.py needs root: it drops the page cache, creates cgroups and sets readahead")
    if not args.model.exists():
        sys.exit(f"{args.model} is missing: make it with bench/make_model.py {args.model}")
    if not args.odmoe.exists():
        sys.exit(f"{args.odmoe} is missing: cargo build --release")

    vocab = 32000 - 3  # the generator's vocabulary without its special tokens
    rng = random.Random(args.seed)
    prompt = [rng.randrange(vocab) for _ in range(args.prompt_tokens)]
    feed = [rng.randrange(vocab) for _ in range(args.tokens)]
    readahead = readahead_file(args.model)
    read_bps = None if args.read_rate is None else int(args.read_rate * GB)
    device = (disk_of(args.model) / "dev").read_text().strip()
    default_ra = int(readahead.read_text())

    extra = args.odmoe_args.split()

    def odmoe_cmd(limit, feed_ids, prefetch="lookahead"):
        cmd = [str(args.odmoe), "bench", "decode", "--model", str(args.model), "--json",
               "--prompt-ids", ",".join(map(str, prompt)), "--tokens", str(args.tokens)]
        if limit is None:
            cmd += ["--resident"]
        elif prefetch == "none":
            cmd += ["--expert-budget", f"{limit - ODMOE_RESERVE}B", "--prefetch-experts", "none"]
        else:
            cmd += ["--expert-budget", f"{limit - ODMOE_RESERVE}B"] + extra
            # A recording replaces the predictor: odmoe refuses both at once.
            if "--prefetch-from-trace" not in extra:
                cmd += ["--prefetch-experts", prefetch]
        if feed_ids:
            cmd += ["--feed-ids", ",".join(map(str, feed_ids))]
        return cmd

    def llama_cmd(feed_ids):
        cmd = [args.python, str(ROOT / "bench/llama_cpp_decode.py"), str(args.model),
               "--prompt-ids", ",".join(map(str, prompt)), "--tokens", str(args.tokens)]
        if feed_ids:
            cmd += ["--feed-ids", ",".join(map(str, feed_ids))]
        if args.llama_no_repack:
            cmd += ["--no-repack"]
        return cmd

    limits = ([] if args.no_warm else [None]) + [int(float(x) * GB) for x in args.limits.split(",") if x]
    engines = set(args.engines.split(","))
    if not engines <= {"llama.cpp", "odmoe"}:
        sys.exit(f"--engines: llama.cpp and/or odmoe, not {args.engines}")
    results = []
    try:
        for feed_kind in args.feeds.split(","):
            feed_ids = feed if feed_kind == "random" else None
            for limit in limits:
                condition = (f"warm, no limit (median of {args.warm_repeats})" if limit is None
                             else f"{limit / GB:g} GB limit")
                if limit is not None and read_bps is not None:
                    condition += f", reads at {args.read_rate:g} GB/s"
                runs = []
                if limit is None:
                    # Warm: the file in the page cache for llama.cpp, every expert loaded for odmoe.
                    sh("sh", "-c", f"cat {args.model} > /dev/null")
                if "llama.cpp" in engines:
                    runs.append(("llama.cpp", llama_cmd(feed_ids), default_ra))
                    if limit is not None:
                        runs.append(("llama.cpp ra=128K", llama_cmd(feed_ids), READAHEAD_TUNED_KB))
                if "odmoe" in engines:
                    runs.append(("odmoe", odmoe_cmd(limit, feed_ids), default_ra))
                if "odmoe" in engines and limit is not None:
                    # Lookahead prefetch is the default; on this model's near-uniform routing its
                    # wrong guesses evict experts that would have been hits, so show it off too.
                    runs.append(("odmoe, no prefetch", odmoe_cmd(limit, feed_ids, "none"), default_ra))
                # Warm runs take seconds and vary with what the machine's neighbours do: repeat
                # them, the engines taking turns, and keep each engine's median run.
                rounds = args.warm_repeats if limit is None else args.limited_repeats
                tries = {name: [] for name, _, _ in runs}
                for round_ in range(rounds):
                    # Every other round in reverse: on this machine the second run of a pair was
                    # faster to its first token in 7 of 9 pairs (the host may keep what the
                    # first read), which would favour whichever engine always came second.
                    for name, cmd, ra in runs[::-1] if round_ % 2 else runs:
                        readahead.write_text(str(ra))
                        print(f"{feed_kind} / {condition} / {name} ({round_ + 1}/{rounds}) ...",
                              file=sys.stderr, flush=True)
                        throttle = (None, None) if limit is None else (read_bps, device)
                        tries[name].append(run_engine(name.replace(" ", "_"), cmd, limit,
                                                      limit is None, *throttle))
                for name, _, ra in runs:
                    r = median_run(tries[name])
                    r.update(condition=condition, feed=feed_kind, limit=limit, readahead_kb=ra, name=name,
                             decode_tok_s_runs=[t.get("decode_tok_s") for t in tries[name]])
                    results.append(r)
    finally:
        readahead.write_text(str(default_ra))

    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results):
    print("| feed | condition | engine | TTFT s | decode tok/s | odmoe ÷ this (no prefetch) | read/token (misses x size) | peak RSS | cgroup peak | odmoe hits: store, no read (Belady) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['feed']} | {r['condition']} | {r['name']} | failed: {r['failed']} |||||||")
            continue

        def ours(name):
            return next((o for o in results if o.get("name") == name and o["condition"] == r["condition"]
                         and o["feed"] == r["feed"] and "failed" not in o), None)

        ratio = ""
        if r["name"] == "odmoe" and ours("odmoe, no prefetch"):
            ratio = f"prefetch on ÷ off: {r['decode_tok_s'] / ours('odmoe, no prefetch')['decode_tok_s']:.2f}x"
        if r["engine"] != "odmoe":
            ratios = [f"{o['decode_tok_s'] / r['decode_tok_s']:.1f}x" for o in (ours("odmoe"), ours("odmoe, no prefetch")) if o]
            ratio = ratios[0] + (f" ({ratios[1]})" if len(ratios) > 1 else "")
        hits = ""
        read = fmt_bytes(r["decode_bytes_read_per_token"])
        if r["engine"] == "odmoe" and r.get("hit_rate") is not None:
            hits = f"{r['hit_rate']:.2f}, {r['read_free_rate']:.2f} ({r['belady_hit_rate']:.2f})"
            read += f" ({fmt_bytes(r['decode_miss_bytes_per_token'])})"
        print(f"| {r['feed']} | {r['condition']} | {r['name']} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.2f} | {ratio} "
              f"| {read} | {fmt_bytes(r['peak_rss_bytes'])} "
              f"| {fmt_bytes(r.get('cgroup_peak_bytes'))} | {hits} |")


if __name__ == "__main__":
    main()
