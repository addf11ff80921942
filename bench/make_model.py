#!/usr/bin/env python3
"""Writes a large synthetic qwen3moe GGUF with real-model dimensions, for the comparison benchmark.

The shapes are those of a Qwen3-30B-A3B-class layer (hidden 2048, 64 experts of width 768, top-8,
16 query heads and 4 KV heads of 128), with fewer layers and a 32k vocabulary so the file is about
6 GB. Weights are random Q8_0 blocks written straight from random int8 quants (no float round
trip), scaled so activations keep unit size and routing depends on the token: router logits have a
standard deviation of about 2, so different tokens choose different experts. Random weights route
nearly uniformly, which is the hard case for an expert cache.

The vocabulary is a byte-level BPE one (256 byte tokens, a few merges, filler tokens): benchmarks
feed token ids, not text, but both engines need a loadable tokenizer.

With `--type` other than q8_0 (q4_k_m, q5_k_m, q6_k, q4_0, ...), the Q8_0 file is written first
and then quantized by llama.cpp's own quantizer (bench/requantize.py; the reference environment of
scripts/setup-reference-venv.sh), so the model exists in the types users download. Requantizing
keeps Q8_0's rounding: such a file serves speed and memory comparisons, not quality ones.

`--context` sets the positions the model declares (4096 by default): long-prompt benchmarks
raise it to 32768 or more.

`--skew S` gives routing structure: each layer's router rows get norms that fall as a Zipf law
of exponent S over a random order of its experts (rank r scaled by r^-S, normalised to keep the
logits' overall size). A row with a larger norm wins the top-k more often, so a few experts per
layer become popular, as in trained models. The script prints the popularity that results on
random hidden states (the share of routings the most chosen eighth of the experts takes; 0.125
is uniform); `odmoe trace record` on the finished model counts it on real tokens.

`--experts`, `--top-k` and `--expert-width` change the expert shapes, for read-path benchmarks
at other experts' sizes: `--experts 8 --top-k 2 --expert-width 14336` gives Mixtral 8x7B's
expert width (slices of 31 MB in Q8_0, 16.5 MB in Q4_K at this hidden size).

Usage: make_model.py OUT.gguf [--layers 18] [--seed 0] [--type q8_0] [--context 4096] [--skew 0]
                     [--experts 64] [--top-k 8] [--expert-width 768]
"""

import argparse
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

HIDDEN = 2048
HEADS = 16
KV_HEADS = 4
HEAD_DIM = 128
EXPERTS = 64
TOP_K = 8
EXPERT_WIDTH = 768
VOCAB = 32000
ROUTER_STD = 0.05  # logits std ~ 0.05 * sqrt(2048) = 2.3 on a unit-rms hidden state
Q8_BLOCK = 32
Q8_BYTES = 34  # f16 scale + 32 int8


def byte_level_chars():
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def vocabulary():
    tokens = byte_level_chars()
    merges = []
    for word in ["Ġt", "Ġa", "he", "in", "re", "on"]:
        merges.append(f"{word[0]} {word[1]}")
        tokens.append(word)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    filler = VOCAB - len(tokens) - len(specials)
    tokens += [f"<filler_{i}>" for i in range(filler)] + specials
    types = [gguf.TokenType.NORMAL] * (VOCAB - len(specials)) + [gguf.TokenType.CONTROL] * len(specials)
    return tokens, merges, types


def q8_0(rng, rows, cols, std):
    """Random Q8_0 blocks for a `[rows, cols]` matrix whose values have standard deviation `std`."""
    blocks = cols // Q8_BLOCK
    out = np.empty((rows, blocks, Q8_BYTES), dtype=np.uint8)
    # Uniform int8 in [-127, 127] has a standard deviation of 73.6.
    scale = np.float16(std / 73.6)
    out[:, :, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    out[:, :, 2:] = rng.integers(-127, 128, size=(rows, blocks, Q8_BLOCK), dtype=np.int8).view(np.uint8)
    return out.reshape(rows, blocks * Q8_BYTES)


def tensors(layers):
    """(name, GGUF-order shape, kind, std) in file order; shapes are numpy order (outer first)."""
    out = [("token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0, 1.0)]
    for l in range(layers):
        p = f"blk.{l}."
        out += [
            (p + "attn_norm.weight", (HIDDEN,), Q.F32, None),
            (p + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), Q.Q8_0, HIDDEN ** -0.5),
            (p + "attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q8_0, HIDDEN ** -0.5),
            (p + "attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q8_0, HIDDEN ** -0.5),
            (p + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), Q.Q8_0, (HEADS * HEAD_DIM) ** -0.5),
            (p + "attn_q_norm.weight", (HEAD_DIM,), Q.F32, None),
            (p + "attn_k_norm.weight", (HEAD_DIM,), Q.F32, None),
            (p + "ffn_norm.weight", (HIDDEN,), Q.F32, None),
            (p + "ffn_gate_inp.weight", (EXPERTS, HIDDEN), Q.F32, ROUTER_STD),
            (p + "ffn_gate_exps.weight", (EXPERTS, EXPERT_WIDTH, HIDDEN), Q.Q8_0, HIDDEN ** -0.5),
            (p + "ffn_up_exps.weight", (EXPERTS, EXPERT_WIDTH, HIDDEN), Q.Q8_0, HIDDEN ** -0.5),
            (p + "ffn_down_exps.weight", (EXPERTS, HIDDEN, EXPERT_WIDTH), Q.Q8_0, EXPERT_WIDTH ** -0.5),
        ]
    out += [
        ("output_norm.weight", (HIDDEN,), Q.F32, None),
        ("output.weight", (VOCAB, HIDDEN), Q.Q8_0, HIDDEN ** -0.5),
    ]
    return out


def zipf_scales(rng, experts, skew):
    """Per-expert router row scales: rank r (in a random order) gets r^-skew, RMS 1."""
    scales = np.arange(1, experts + 1, dtype=np.float64) ** -skew
    scales /= np.sqrt(np.mean(scales ** 2))
    return rng.permutation(scales).astype(np.float32)


def popularity(router, samples=4096, seed=1):
    """Share of top-k routings the most chosen eighth of the experts takes, on random hidden states."""
    hidden = np.random.default_rng(seed).standard_normal((samples, router.shape[1]), dtype=np.float32)
    chosen = np.argsort(-(hidden @ router.T), axis=1)[:, :TOP_K]
    counts = np.sort(np.bincount(chosen.ravel(), minlength=router.shape[0]))[::-1]
    return counts[: max(1, router.shape[0] // 8)].sum() / counts.sum()


def data(rng, shape, kind, std, skew=0.0):
    if kind == Q.F32:
        if std is None:  # norm weights
            return np.ones(shape, dtype=np.float32)
        weights = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
        if skew and len(shape) == 2 and shape[0] == EXPERTS:  # a router
            weights *= zipf_scales(rng, EXPERTS, skew)[:, None]
        return weights
    rows = int(np.prod(shape[:-1]))
    return q8_0(rng, rows, shape[-1], std).reshape(*shape[:-1], -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--type", default="q8_0", help="llama.cpp file type (see bench/requantize.py)")
    parser.add_argument("--context", type=int, default=4096, help="positions the model declares")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="Zipf exponent of the router rows' norms (0: uniform routing)")
    parser.add_argument("--experts", type=int, default=EXPERTS, help="experts per layer")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="experts each token routes to")
    parser.add_argument("--expert-width", type=int, default=EXPERT_WIDTH,
                        help="an expert's intermediate size (a multiple of 256)")
    args = parser.parse_args()
    if args.skew < 0:
        sys.exit("--skew must be 0 or more")
    if not 0 < args.top_k <= args.experts:
        sys.exit("--top-k must be from 1 to --experts")
    if args.expert_width <= 0 or args.expert_width % 256:
        sys.exit("--expert-width must be a positive multiple of 256 (whole K-quant blocks)")
    set_expert_shape(args.experts, args.top_k, args.expert_width)
    if args.type != "q8_0":
        try:
            from requantize import FTYPES, requantize
        except ImportError as error:
            sys.exit(f"--type {args.type} needs llama-cpp-python (scripts/setup-reference-venv.sh): {error}")
        if args.type not in FTYPES:
            sys.exit(f"--type {args.type}: one of q8_0, {', '.join(sorted(FTYPES))}")
        q8_0 = args.out + ".q8_0"
        write_q8_0(q8_0, args.layers, args.seed, args.context, args.skew)
        requantize(q8_0, args.out, args.type)
        os.remove(q8_0)
        print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e9:.2f} GB, {args.type}")
        return
    write_q8_0(args.out, args.layers, args.seed, args.context, args.skew)


def set_expert_shape(experts, top_k, width):
    """Replaces the default expert count, top-k and width for the whole file."""
    global EXPERTS, TOP_K, EXPERT_WIDTH
    EXPERTS, TOP_K, EXPERT_WIDTH = experts, top_k, width


def write_q8_0(out, layers, seed, context, skew=0.0):
    """Writes the model in Q8_0 to `out`, through a temporary name."""
    tmp = out + ".partial"
    writer = gguf.GGUFWriter(tmp, "qwen3moe")
    writer.add_name("odmoe-bench-qwen3moe")
    writer.add_context_length(context)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(EXPERT_WIDTH)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(TOP_K)
    writer.add_expert_feed_forward_length(EXPERT_WIDTH)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, merges, types = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(VOCAB - 3)
    writer.add_eos_token_id(VOCAB - 1)
    writer.add_add_bos_token(False)

    plan = tensors(layers)
    for name, shape, kind, _ in plan:
        if kind == Q.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            nbytes = int(np.prod(shape)) // Q8_BLOCK * Q8_BYTES
            byte_shape = (*shape[:-1], shape[-1] // Q8_BLOCK * Q8_BYTES)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(s)) * (4 if k == Q.F32 else Q8_BYTES / Q8_BLOCK) for _, s, k, _ in plan)
    done = 0
    shares = []
    for name, shape, kind, std in plan:
        array = data(rng, shape, kind, std, skew)
        if name.endswith("ffn_gate_inp.weight"):
            shares.append(popularity(array))
        writer.write_tensor_data(array)
        done += array.nbytes
        print(f"\r{done / 1e9:5.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)
    writer.close()
    print(file=sys.stderr)
    os.rename(tmp, out)
    print(f"wrote {out}: {os.path.getsize(out) / 1e9:.2f} GB, {layers} layers; the top eighth of each "
          f"layer's experts takes {np.mean(shares):.3f} of routings on random states (skew {skew})")


if __name__ == "__main__":
    main()
