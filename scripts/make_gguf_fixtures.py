#!/usr/bin/env python3
"""Build the GGUF reference fixtures in tests/fixtures/gguf/ and their golden outputs.

Everything here is produced by llama.cpp's own tools, taken from the llama-cpp-python source
package (pinned below) so that converter, quantizer and runtime are one llama.cpp version:

* ``vendor/llama.cpp/convert_hf_to_gguf.py`` (with its ``gguf-py``) converts Hugging Face
  checkpoints to f32 GGUF;
* ``llama_cpp.llama_model_quantize`` quantizes them (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_M,
  Q6_K); the tensor types of every output are checked, because llama.cpp silently falls back to
  another type when a row length is not a multiple of the block size;
* llama-cpp-python runs them for the ``llama_*`` goldens;
* ``gguf.quants.dequantize`` (gguf-py) dequantizes every tensor for the ``dequant_*`` goldens,
  which transformers computes in float32 after the GGUF tensors are mapped back to Hugging Face
  names (undoing llama.cpp's Q/K row permutation for Mixtral).

Fixtures (``tests/fixtures/gguf/``):

    <arch>-f32.gguf, <arch>-q8_0.gguf          arch in qwen2_moe, qwen3_moe, mixtral: the existing
                                                tests/fixtures/<arch> checkpoints (hidden 64)
    qwen3_moe-q4_0.gguf, -q4_1, -q5_0, -q5_1   the other 32-value block types, qwen3_moe only
    <arch>-k-q4_k_m.gguf, <arch>-k-q6_k.gguf    new tiny random models, hidden 256, every matrix
                                                input dimension a multiple of 256 (K-quant rows)
    <file>.golden.safetensors                   goldens for each GGUF file (see below)
    vocab/ggml-vocab-*.gguf{,.inp,.out}         llama.cpp's vocab-only GGUFs with their tokenizer
                                                test vectors (copied unchanged)
    gguf.json                                   summary: seeds, sizes, types, measured differences
    README.md                                   layouts and metadata of every file (generated)

Golden tensors, T = 12 prompt tokens, V = 512, L layers, k experts per token:

    input_ids            I64 [T]        prompt (for <arch>-*: the same ids as tests/fixtures/<arch>)
    llama_logits         F32 [T, V]     llama.cpp logits for every prompt position (f32 KV cache)
    llama_greedy         I64 [16]       llama.cpp greedy continuation (plain argmax, KV cache)
    dequant_logits       F32 [T, V]     transformers, float32, on the dequantized GGUF weights
    dequant_routing_ids  I64 [L, T, k]  experts chosen on the dequantized weights (topk order)
    dequant_greedy       I64 [16]       greedy continuation on the dequantized weights

Run by hand with the reference venv (scripts/setup-reference-venv.sh):

    ~/.cache/odmoe/refvenv/bin/python scripts/make_gguf_fixtures.py            # build + verify
    ~/.cache/odmoe/refvenv/bin/python scripts/make_gguf_fixtures.py --verify   # verify only

Intermediate files (llama.cpp sources, the K fixtures' Hugging Face checkpoints and f32 GGUF)
go to ~/.cache/odmoe/gguf-work (ODMOE_GGUF_WORK). Output is deterministic for given package
versions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

ROOT = mf.ROOT
FIXTURES = mf.FIXTURES
OUT = FIXTURES / "gguf"
VOCAB_OUT = OUT / "vocab"
WORK = Path(os.environ.get("ODMOE_GGUF_WORK", Path.home() / ".cache" / "odmoe" / "gguf-work"))

LLAMA_CPP_PYTHON = "0.3.36"  # llama.cpp converter, quantizer and runtime all come from this
N_CTX = 64
N_THREADS = 2
# Bytes, the whole tests/fixtures/gguf directory (git-ignored files excepted). Raised from
# 16 MB to 17 MB for qwen3_moe's Q4_0 / Q4_1 / Q5_0 / Q5_1 files and their goldens (1.06 MB),
# which take the directory from 15.83 MB (with deepseek_v3-bf16) to ~16.9 MB; without Q5_1 it
# would still be ~16.6 MB. Raised to 19.5 MB for glm4_moe-bf16, gpt_oss-bf16, gpt_oss-q8_0 and
# gpt_oss-mxfp4 and their goldens (0.6, 0.6, 0.35 and 0.28 MB), and glm4_moe-q8_0 (0.4 MB).
BUDGET = 20_000_000
HF_KEEP_LIMIT = 1_500_000  # a K fixture's bf16 checkpoint is committed only below this size
TOL_F32_LLAMA = 1e-4  # llama.cpp (f32 GGUF, f32 KV cache) vs transformers
TOL_F32_DEQUANT = 1e-5  # transformers on dequantized f32 GGUF vs transformers on the checkpoint

SMALL = ["qwen2_moe", "qwen3_moe", "mixtral"]
# Files in OUT that another script builds and verifies (they share OUT's budget).
OTHER_SCRIPTS = {
    "deepseek_v3-bf16.gguf": "scripts/make_gguf_bf16_fixtures.py",
    "glm4_moe-bf16.gguf": "scripts/make_gguf_bf16_fixtures.py",
    "gpt_oss-bf16.gguf": "scripts/make_gguf_bf16_fixtures.py",
    "gpt_oss-q8_0.gguf": "scripts/make_gguf_bf16_fixtures.py",
    "gpt_oss-mxfp4.gguf": "scripts/make_gguf_bf16_fixtures.py",
    "glm4_moe-q8_0.gguf": "scripts/make_gguf_bf16_fixtures.py",
}
SMALL_QUANTS = ["q8_0"]
# The other 32-value block types, for one hidden-64 architecture only (the byte budget).
BLOCK32_QUANTS = ["q4_0", "q4_1", "q5_0", "q5_1"]
SMALL_EXTRA_QUANTS = {"qwen3_moe": BLOCK32_QUANTS}
K_QUANTS = ["q4_k_m", "q6_k"]
QTYPES = ["f32"] + SMALL_QUANTS + BLOCK32_QUANTS + K_QUANTS
QTYPE_RE = "|".join(QTYPES)  # the type part of a fixture's file name

# llama.cpp file types (LLAMA_FTYPE_MOSTLY_*), and the tensor types each may contain (Q4_K_M is
# a mixture by design: Q6_K for output and for attn_v / ffn_down of some layers, Q4_K elsewhere).
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q6_k": 18}
# The 32-value block files (built for qwen3_moe, hidden 64, 8 experts) also hold Q8_0 tensors,
# as llama.cpp's llama_tensor_get_type (llama-quant.cpp) decides; check_types checks exactly which
# (block32_type), namely, in qwen3_moe-q4_0 / q4_1 / q5_0 / q5_1.gguf:
# * the output matrix, here token_embd.weight (tied embeddings): the output is asked as Q6_K
#   (any ftype but Q8_0), whose 256-value rows do not divide 64, so llama.cpp falls back to Q8_0
#   ("ncols 64 not divisible by 256 (required for type q6_K) -> falling back to q8_0");
# * attn_k.weight and attn_v.weight of every layer: bumped to Q8_0 in any model with exactly 8
#   experts ("for the 8-expert model, bumping this to Q8_0 trades just ~128MB").
# attn_q, attn_output and ffn_{gate,up,down}_exps have the file's type; norms, routers stay F32.
ALLOWED = {
    "q8_0": {"Q8_0"},
    **{q: {q.upper(), "Q8_0"} for q in BLOCK32_QUANTS},
    "q4_k_m": {"Q4_K", "Q6_K"},
    "q6_k": {"Q6_K"},
}
BLOCK = {"q8_0": 32, **{q: 32 for q in BLOCK32_QUANTS}, "q4_k_m": 256, "q6_k": 256}

# Vocab-only GGUFs copied from llama.cpp's models/ (with their .inp/.out test vectors): the BPE
# ("gpt2" tokenizer model) ones and llama-spm for the SentencePiece path, as far as they fit
# BUDGET next to the model fixtures (~14.5 MB when chosen, for a 16 MB budget). Only llama-spm
# (0.72 MB) does: the smallest BPE vocabulary, deepseek-coder (1.16 MB), would take the
# directory to ~16.4 MB (~18 MB with the Q4_0-Q5_1 files); gpt-2, starcoder, refact and mpt
# are 1.7-1.8 MB, qwen2 5.9 MB, llama-bpe 7.8 MB.
VOCABS = ["llama-spm"]
VOCAB_SEP = "\n__ggml_vocab_test__\n"

# K fixtures: same recipe as make_fixtures.py, sizes such that every matrix has 256 columns
# (the K-quant super-block) or a multiple of it.
K_DIMS = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
K_EXTRA = {
    "qwen2_moe": dict(
        intermediate_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
        num_experts=4, num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        head_dim=64, intermediate_size=256, moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
    ),
    "mixtral": dict(intermediate_size=256, num_local_experts=4, num_experts_per_tok=2),
}
# make_fixtures.py's standard deviations were chosen for fan-in 64; at fan-in 256 they are
# scaled by sqrt(64 / 256) so activations, router logits and output logits keep the scale
# that makes norms and routing matter (router logits std ~2, output logits std ~2).
K_STD_SCALE = 0.5
K_MIN_QUANT_ROUTING_GAP = mf.MIN_ROUTING_GAP
K_MIN_QUANT_GREEDY_MARGIN = mf.MIN_GREEDY_MARGIN
# A K fixture's seed is also rejected when llama.cpp and the exact dequantized math disagree
# on the prompt by more than activation-quantization noise (a routing decision flipped by
# llama.cpp's Q8 activations). Their greedy continuations may still part after a few tokens.
K_MAX_LLAMA_VS_DEQUANT = 0.75
K_MAX_ATTEMPTS = 60


def k_name(arch):
    return f"{arch}-k"


for _arch in SMALL:
    _spec = copy.deepcopy(mf.SPECS[_arch])
    _spec["config"].update(K_DIMS)
    _spec["config"].update(K_EXTRA[_arch])
    _spec["top_k"] = 2
    _spec["shard_size"] = None
    mf.SPECS[k_name(_arch)] = _spec


@contextlib.contextmanager
def k_init_scale():
    saved = (mf.EMBED_STD, mf.LINEAR_STD, mf.BIAS_STD, mf.ROUTER_STD)
    mf.EMBED_STD, mf.LINEAR_STD, mf.ROUTER_STD = (s * K_STD_SCALE for s in (saved[0], saved[1], saved[3]))
    try:
        yield
    finally:
        mf.EMBED_STD, mf.LINEAR_STD, mf.BIAS_STD, mf.ROUTER_STD = saved


# ----------------------------------------------------------------------------- llama.cpp sources


def llama_cpp_dir() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python source package (downloaded once)."""
    env = os.environ.get("ODMOE_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    src = WORK / "src"
    d = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (d / "convert_hf_to_gguf.py").exists():
        src.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(src),
        ])
        with tarfile.open(src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tf:
            tf.extractall(src, filter="data")
    return d


def check_versions():
    import gguf  # noqa: F401
    import llama_cpp

    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        raise SystemExit(f"llama-cpp-python {llama_cpp.__version__} installed, {LLAMA_CPP_PYTHON} expected")


# The converter fingerprints a BPE tokenizer's pre-tokenizer by hashing the encoding of a fixed
# text and refuses unknown ones. The fixtures' tokenizer is a byte-level BPE with the GPT-2
# pre-tokenizer regex, so "gpt-2" is its llama.cpp pre-tokenizer type.
CONVERT_WRAPPER = """
import sys, runpy
llama = sys.argv[1]
sys.path.insert(0, llama)
sys.path.insert(1, llama + "/gguf-py")
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# GLM's vocabulary writer looks up GLM's special tokens, which the fixtures' tokenizer lacks.
import conversion.glm as glm
glm.Glm4MoeModel.set_vocab = base.TextModel._set_vocab_gpt2
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(llama + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(hf_dir: Path, out: Path, model_name: str, outtype: str = "f32"):
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-c", CONVERT_WRAPPER, str(llama_cpp_dir()), str(hf_dir),
        "--outtype", outtype, "--outfile", str(out), "--model-name", model_name,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"conversion of {hf_dir} failed")


def quantize(src: Path, dst: Path, qtype: str):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[qtype]
    p.nthread = N_THREADS
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src.name} -> {qtype}) failed: {rc}")


def keeps_f32(name, ndim):
    """Tensors llama.cpp's quantizer leaves alone (llama-quant.cpp: 1-D, norms, routers)."""
    return ndim < 2 or not name.endswith("weight") or name.endswith("_norm.weight") or "ffn_gate_inp.weight" in name


def block32_type(name, qtype, ncols, n_expert, has_output):
    """The type llama.cpp gives a quantized tensor of a Q4_0 / Q4_1 / Q5_0 / Q5_1 file (see
    ALLOWED): the output matrix (token_embd when tied) Q6_K, or Q8_0 when its rows are not a
    multiple of 256; attn_k / attn_v Q8_0 in an 8-expert model; the file's type elsewhere."""
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        return "Q8_0" if ncols % 256 else "Q6_K"
    if n_expert == 8 and re.fullmatch(r"blk\.\d+\.attn_[kv]\.weight", name):
        return "Q8_0"
    return qtype.upper()


def check_types(path: Path, qtype: str):
    """Fail unless every tensor has the type the requested file type implies. Accepted
    exceptions: a Q8_0 tensor whose rows are not a multiple of 32 is F16 (llama.cpp's fallback),
    which happens for the hidden-64 Mixtral's ffn_down_exps (rows of 48); in the 32-value block
    files the tensors block32_type names are Q8_0 (see ALLOWED)."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    n_expert = r.fields[f"{arch}.expert_count"].contents()
    has_output = any(t.name == "output.weight" for t in r.tensors)
    fallbacks = []
    for t in r.tensors:
        ty = t.tensor_type.name
        ncols = int(t.shape[0])
        if keeps_f32(t.name, len(t.shape)):
            ok = ty == "F32"
        elif ncols % BLOCK[qtype]:
            ok = qtype == "q8_0" and ty == "F16"
            fallbacks.append(t.name)
        elif qtype in BLOCK32_QUANTS:
            ok = ty in ALLOWED[qtype] and ty == block32_type(t.name, qtype, ncols, n_expert, has_output)
        else:
            ok = ty in ALLOWED[qtype]
        if not ok:
            raise SystemExit(f"{path.name}: {t.name} {list(map(int, t.shape))} is {ty}, not as {qtype} requires")
    if qtype != "q8_0" and fallbacks:
        raise SystemExit(f"{path.name}: K-quant rows not a multiple of 256: {fallbacks}")
    return fallbacks


def check_f32(path: Path):
    import gguf

    bad = [t.name for t in gguf.GGUFReader(path).tensors if t.tensor_type.name != "F32"]
    if bad:
        raise SystemExit(f"{path.name}: not F32: {bad}")


# ----------------------------------------------------------------------------- goldens


def llama_goldens(path: Path, ids):
    """Logits for every prompt position and a greedy continuation from llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(
        str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
        logits_all=True, type_k=0, type_v=0, flash_attn=False, seed=0, verbose=False,
    )
    ids = [int(i) for i in ids]
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    new, margins = [], []
    for _ in range(mf.N_GREEDY):
        row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top2 = np.sort(row)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tok = int(np.argmax(row))
        new.append(tok)
        llm.eval([tok])
    llm.close()
    return torch.from_numpy(logits), torch.tensor(new, dtype=torch.int64), min(margins)


def unpermute(w, n_head):
    """Inverse of llama.cpp's LlamaModel.permute (rotary halves -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_from_gguf(path: Path, model_class: str, cfg: dict):
    """Dequantize every tensor and name it as the Hugging Face checkpoint does on disk."""
    import gguf

    mixtral = model_class == "MixtralForCausalLM"
    moe = "block_sparse_moe" if mixtral else "mlp"
    simple = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate_inp": f"{moe}.gate",
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    }
    mixtral_w = {"gate": "w1", "down": "w2", "up": "w3"}
    n_head = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    state = {}
    r = gguf.GGUFReader(path)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: [E, out, in] / [out, in]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
            continue
        if t.name == "output.weight":
            state["lm_head.weight"] = w
            continue
        if t.name == "output_norm.weight":
            state["model.norm.weight"] = w
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if not m:
            raise SystemExit(f"{path.name}: unexpected tensor {t.name}")
        layer, base, kind = m.groups()
        prefix = f"model.layers.{layer}."
        if base in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            proj = base.split("_")[1]
            for e in range(shape[0]):
                sub = f"experts.{e}.{mixtral_w[proj]}" if mixtral else f"experts.{e}.{proj}_proj"
                state[f"{prefix}{moe}.{sub}.{kind}"] = np.ascontiguousarray(w[e])
            continue
        if mixtral and base == "attn_q":
            w = unpermute(w, n_head)
        elif mixtral and base == "attn_k":
            w = unpermute(w, n_kv)
        state[f"{prefix}{simple[base]}.{kind}"] = np.ascontiguousarray(w)
    return state


def hf_shapes(hf_dir: Path):
    from safetensors import safe_open

    shapes = {}
    for f in sorted(hf_dir.glob("model*.safetensors")):
        with safe_open(str(f), "np") as s:
            for k in s.keys():
                shapes[k] = tuple(s.get_slice(k).get_shape())
    return shapes


def dequant_goldens(path: Path, hf_dir: Path, spec_name: str, ids):
    """transformers (float32, eager attention) on the dequantized GGUF weights."""
    import transformers
    from safetensors.numpy import save_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    spec = mf.SPECS[spec_name]
    state = hf_state_from_gguf(path, spec["model_class"], cfg)
    want = hf_shapes(hf_dir)
    if set(state) != set(want):
        raise SystemExit(
            f"{path.name}: GGUF -> HF names differ: missing {sorted(set(want) - set(state))[:5]}, "
            f"extra {sorted(set(state) - set(want))[:5]}"
        )
    for k, shape in want.items():
        # Trailing GGUF dims of 1 are not stored once llama.cpp rewrites a file: qwen2moe's
        # ffn_gate_inp_shexp is [H, 1] from the converter but [H] after quantization.
        if state[k].shape != shape:
            if state[k].size != int(np.prod(shape)):
                raise SystemExit(f"{path.name}: {k} has shape {state[k].shape}, checkpoint {shape}")
            state[k] = state[k].reshape(shape)
    tmp = WORK / "dequant" / path.stem
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copy(hf_dir / "config.json", tmp / "config.json")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cls = getattr(transformers, spec["model_class"])
    model = cls.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    # Loading must reproduce the dequantized values exactly.
    sd = model.state_dict()
    emb = sd["model.embed_tokens.weight"].numpy()
    assert np.array_equal(emb, state["model.embed_tokens.weight"]), "embedding changed on load"
    g = mf.goldens_for(model, spec_name, torch.as_tensor(ids, dtype=torch.int64))
    shutil.rmtree(tmp)
    return g


# ----------------------------------------------------------------------------- HF checkpoints


def hf_reference(arch):
    """(checkpoint dir, spec name, input_ids, golden dict) for an existing hidden-64 fixture."""
    from safetensors.torch import load_file

    d = FIXTURES / arch
    g = load_file(str(d / "golden.safetensors"))
    gold = dict(logits=g["logits"], routing_ids=g["routing_ids"], greedy_tokens=g["greedy_tokens"])
    return d, arch, g["input_ids"], gold


def save_hf(model, out_dir: Path, special_ids, tok, hub_spelling):
    import transformers

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    mf.write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": None,
            "eos_token_id": special_ids["<|im_end|>"],
            "pad_token_id": special_ids["<|endoftext|>"],
            "transformers_version": transformers.__version__,
        },
    )
    tok.save(str(out_dir / "tokenizer.json"))
    mf.write_json(out_dir / "tokenizer_config.json", mf.tokenizer_config(special_ids))
    if hub_spelling:
        mf.rewrite_hub_spelling(out_dir / "config.json")


def build_k_checkpoint(arch, tok, special_ids, start):
    """Seed search (make_fixtures.py's margins) and the bf16 checkpoint in WORK/hf/<name>."""
    import transformers

    name = k_name(arch)
    spec = mf.SPECS[name]
    with k_init_scale():
        seed = mf.search_seed(name, special_ids, start=start)
        model, f32 = mf.build_model(name, seed, special_ids)
    ids = mf.prompt_ids(seed, special_ids)
    out_dir = WORK / "hf" / name
    save_hf(model, out_dir, special_ids, tok, spec["hub_spelling"])
    cls = getattr(transformers, spec["model_class"])
    loaded = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    g = mf.goldens_for(loaded, name, ids)
    g_mem = mf.goldens_for(f32, name, ids)
    for key in ("logits", "routing_ids", "greedy_tokens"):
        assert torch.equal(g[key], g_mem[key]), f"{name}: {key} differs after save/load"
    return seed, out_dir, ids, g


# ----------------------------------------------------------------------------- fixtures


def common_prefix(a, b):
    n = 0
    for x, y in zip(a.tolist(), b.tolist()):
        if x != y:
            break
        n += 1
    return n


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def write_golden(path: Path, ids, lg, greedy_llama, dq):
    from safetensors.torch import save_file

    tensors = {
        "input_ids": torch.as_tensor(ids, dtype=torch.int64),
        "llama_logits": lg,
        "llama_greedy": greedy_llama,
        "dequant_logits": dq["logits"],
        "dequant_routing_ids": dq["routing_ids"],
        "dequant_greedy": dq["greedy_tokens"],
    }
    # One metadata key only: safetensors writes a map's keys in no fixed order.
    meta = {"format": "pt"}
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(golden_path(path)),
        metadata=meta,
    )
    os.chmod(golden_path(path), 0o644)


def golden_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(".gguf")] + ".golden.safetensors")


def evaluate(path: Path, hf_dir: Path, spec_name: str, ids, hf_gold, qtype: str, strict=True):
    """Goldens for one GGUF file plus the checks; returns (record, llama, dequant)."""
    lg, greedy_llama, llama_margin = llama_goldens(path, ids)
    dq = dequant_goldens(path, hf_dir, spec_name, ids)
    rec = {
        "type": qtype,
        "llama_vs_hf_logits": maxdiff(lg, hf_gold["logits"]),
        "dequant_vs_hf_logits": maxdiff(dq["logits"], hf_gold["logits"]),
        "llama_vs_dequant_logits": maxdiff(lg, dq["logits"]),
        "llama_vs_dequant_logits_rms": float((lg - dq["logits"]).pow(2).mean().sqrt()),
        "llama_vs_dequant_per_position": [round(float(x), 4) for x in (lg - dq["logits"]).abs().max(1).values],
        "dequant_vs_hf_logits_rms": float((dq["logits"] - hf_gold["logits"]).pow(2).mean().sqrt()),
        "llama_greedy_equals_dequant": bool(torch.equal(greedy_llama, dq["greedy_tokens"])),
        "llama_dequant_greedy_common_prefix": common_prefix(greedy_llama, dq["greedy_tokens"]),
        "llama_greedy_equals_hf": bool(torch.equal(greedy_llama, hf_gold["greedy_tokens"])),
        "dequant_greedy_equals_hf": bool(torch.equal(dq["greedy_tokens"], hf_gold["greedy_tokens"])),
        "dequant_routing_equals_hf": bool(torch.equal(dq["routing_ids"], hf_gold["routing_ids"])),
        "dequant_min_routing_margin": round(dq["routing_margin"], 6),
        "dequant_min_greedy_margin": round(dq["greedy_margin"], 6),
        "llama_min_greedy_margin": round(llama_margin, 6),
    }
    print(
        f"   {path.name}: max|llama-hf| {rec['llama_vs_hf_logits']:.2e}, max|dequant-hf| "
        f"{rec['dequant_vs_hf_logits']:.2e}, max|llama-dequant| {rec['llama_vs_dequant_logits']:.2e}; "
        f"greedy llama==dequant {rec['llama_greedy_equals_dequant']}, dequant==hf {rec['dequant_greedy_equals_hf']}; "
        f"dequant margins routing {dq['routing_margin']:.3g} greedy {dq['greedy_margin']:.3g}",
        flush=True,
    )
    if qtype == "f32":
        assert rec["llama_vs_hf_logits"] <= TOL_F32_LLAMA, f"{path.name}: llama.cpp f32 differs from transformers"
        assert rec["dequant_vs_hf_logits"] <= TOL_F32_DEQUANT, f"{path.name}: dequantized f32 differs"
        assert rec["dequant_routing_equals_hf"] and rec["dequant_greedy_equals_hf"], path.name
        assert rec["llama_greedy_equals_hf"], f"{path.name}: llama.cpp greedy differs from transformers"
    if strict:
        assert dq["greedy_margin"] > 0, f"{path.name}: KV-cache greedy disagrees with recompute"
    return rec, lg, greedy_llama, dq


def file_record(path: Path):
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def build_small(arch, summary):
    import gguf

    hf_dir, spec_name, ids, gold = hf_reference(arch)
    print(f"[{arch}] from {hf_dir.relative_to(ROOT)}", flush=True)
    f32 = OUT / f"{arch}-f32.gguf"
    convert(hf_dir, f32, f"odmoe-{arch}-tiny")
    check_f32(f32)
    entries = {}
    rec, lg, gl, dq = evaluate(f32, hf_dir, spec_name, ids, gold, "f32")
    write_golden(f32, ids, lg, gl, dq)
    entries[f32.name] = rec
    for q in SMALL_QUANTS + SMALL_EXTRA_QUANTS.get(arch, []):
        out = OUT / f"{arch}-{q}.gguf"
        quantize(f32, out, q)
        rec = {"fallback_f16": check_types(out, q)}
        if q in BLOCK32_QUANTS:
            # The tensors llama.cpp stores as Q8_0 (see ALLOWED), as check_types accepted them.
            rec["q8_0_tensors"] = [t.name for t in gguf.GGUFReader(out).tensors if t.tensor_type.name == "Q8_0"]
        r2, lg, gl, dq = evaluate(out, hf_dir, spec_name, ids, gold, q)
        rec.update(r2)
        write_golden(out, ids, lg, gl, dq)
        entries[out.name] = rec
    summary["files"].update(entries)
    summary["sources"][arch] = {"checkpoint": str(hf_dir.relative_to(ROOT)), "seed": "see tests/fixtures/fixtures.json"}


def build_k(arch, tok, special_ids, summary):
    name = k_name(arch)
    start = 0
    for _attempt in range(K_MAX_ATTEMPTS):
        seed, hf_dir, ids, gold = build_k_checkpoint(arch, tok, special_ids, start)
        print(f"[{name}] seed {seed}", flush=True)
        f32 = WORK / "gguf" / f"{name}-f32.gguf"
        convert(hf_dir, f32, f"odmoe-{name}-tiny")
        check_f32(f32)
        rec32, *_ = evaluate(f32, hf_dir, name, ids, gold, "f32")
        results = {}
        safe = True
        for q in K_QUANTS:
            out = OUT / f"{name}-{q}.gguf"
            quantize(f32, out, q)
            check_types(out, q)
            rec, lg, gl, dq = evaluate(out, hf_dir, name, ids, gold, q, strict=False)
            results[out] = (rec, lg, gl, dq)
            if (
                dq["routing_margin"] < K_MIN_QUANT_ROUTING_GAP
                or dq["greedy_margin"] < K_MIN_QUANT_GREEDY_MARGIN
                or special_ids["<|im_end|>"] in dq["greedy_tokens"].tolist()
                or rec["llama_vs_dequant_logits"] > K_MAX_LLAMA_VS_DEQUANT
            ):
                safe = False
        if safe:
            break
        print(f"[{name}] seed {seed}: quantized files not safe (margins / llama.cpp agreement), next seed", flush=True)
        start = seed + 1
    else:
        raise SystemExit(f"{name}: no safe seed in {K_MAX_ATTEMPTS} attempts")
    for out, (rec, lg, gl, dq) in results.items():
        write_golden(out, ids, lg, gl, dq)
        summary["files"][out.name] = rec
    hf_bytes = sum(p.stat().st_size for p in hf_dir.glob("model*.safetensors"))
    kept = hf_bytes < HF_KEEP_LIMIT
    if kept:
        dst = OUT / "hf" / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(hf_dir, dst)
    cfg = mf.SPECS[name]["config"]
    summary["sources"][name] = {
        "seed": seed,
        "config": {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": cfg["rope_parameters"]["rope_theta"]},
        "top_k": mf.SPECS[name]["top_k"],
        "init_std_scale": K_STD_SCALE,
        "hf_checkpoint_bytes_bf16": hf_bytes,
        "hf_checkpoint_committed": kept,
        "f32_gguf_bytes": f32.stat().st_size,
        "f32_gguf_checks": rec32,
        "hf_logits_std": round(float(gold["logits"].std()), 4),
    }


# ----------------------------------------------------------------------------- vocab


def parse_vocab_tests(inp: Path, out: Path):
    raw = inp.read_bytes().decode("utf-8")
    assert raw.endswith(VOCAB_SEP), inp.name
    texts = raw[: -len(VOCAB_SEP)].split(VOCAB_SEP)
    lines = out.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "", out.name
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(texts) == len(ids), (inp.name, len(texts), len(ids))
    return texts, ids


def check_vocab(path: Path):
    """llama.cpp must reproduce the file's own test vectors (add_special false, parse_special false)."""
    import gguf
    from llama_cpp import Llama

    texts, ids = parse_vocab_tests(Path(str(path) + ".inp"), Path(str(path) + ".out"))
    llm = Llama(str(path), vocab_only=True, verbose=False)
    bad = [t for t, want in zip(texts, ids) if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) != want]
    llm.close()
    r = gguf.GGUFReader(path)
    pre = r.fields.get("tokenizer.ggml.pre")
    return {
        "tokenizer.ggml.model": r.fields["tokenizer.ggml.model"].contents(),
        "tokenizer.ggml.pre": pre.contents() if pre else None,
        "n_tokens": len(r.fields["tokenizer.ggml.tokens"].contents()),
        "tests": len(texts),
        "llama_cpp_mismatches": len(bad),
        "bytes": path.stat().st_size,
    }


def vocab_candidates():
    """Every vocab-only GGUF in llama.cpp's models/ that has test vectors."""
    import gguf

    out = {}
    for f in sorted((llama_cpp_dir() / "models").glob("ggml-vocab-*.gguf")):
        if not Path(str(f) + ".inp").exists():
            continue
        r = gguf.GGUFReader(f)
        pre = r.fields.get("tokenizer.ggml.pre")
        out[f.name[len("ggml-vocab-") : -len(".gguf")]] = {
            "tokenizer.ggml.model": r.fields["tokenizer.ggml.model"].contents(),
            "tokenizer.ggml.pre": pre.contents() if pre else None,
            "bytes": f.stat().st_size,
        }
    return out


def copy_vocabs(summary):
    src = llama_cpp_dir() / "models"
    summary["vocab_candidates"] = vocab_candidates()
    for v in VOCABS:
        assert summary["vocab_candidates"][v]["tokenizer.ggml.model"] in ("gpt2", "llama"), v
    if VOCAB_OUT.exists():
        shutil.rmtree(VOCAB_OUT)
    VOCAB_OUT.mkdir(parents=True)
    for v in VOCABS:
        for suffix in ("", ".inp", ".out"):
            shutil.copy(src / f"ggml-vocab-{v}.gguf{suffix}", VOCAB_OUT / f"ggml-vocab-{v}.gguf{suffix}")
        info = check_vocab(VOCAB_OUT / f"ggml-vocab-{v}.gguf")
        print(f"   vocab {v}: {info}", flush=True)
        if info["llama_cpp_mismatches"]:
            raise SystemExit(f"llama.cpp does not reproduce ggml-vocab-{v}.gguf.out")
        summary["vocab"][v] = info


# ----------------------------------------------------------------------------- README


README_HEAD = """\
# GGUF reference fixtures

Generated by `scripts/make_gguf_fixtures.py` (see `scripts/README.md`); do not edit by hand.

All GGUF files come from llama.cpp's own tools at the version bundled with llama-cpp-python
{llama_cpp_python} (gguf-py {gguf}): `convert_hf_to_gguf.py --outtype f32`, then
`llama_model_quantize` for the quantized types. Each has its goldens in
`<file>.golden.safetensors` (see "Goldens" below); `gguf.json` holds the same facts in
machine-readable form (seeds, sha256, measured differences, per-position differences).

| files | source | sizes |
|-------|--------|-------|
| `<arch>-f32.gguf`, `<arch>-q8_0.gguf` | the checkpoints in `tests/fixtures/<arch>/` (converted from their bf16 weights) | as there (hidden 64) |
| `qwen3_moe-q4_0.gguf`, `qwen3_moe-q4_1.gguf`, `qwen3_moe-q5_0.gguf`, `qwen3_moe-q5_1.gguf` | `tests/fixtures/qwen3_moe/`, quantized from `qwen3_moe-f32.gguf` like the Q8_0 file (these types for this architecture only) | as there (hidden 64) |
| `<arch>-k-q4_k_m.gguf`, `<arch>-k-q6_k.gguf` | tiny random models built by the script (`make_fixtures.py` recipe, seed in `gguf.json`); their bf16 checkpoints (4-5 MB) and f32 GGUF (8-11 MB) are not committed | hidden 256, 2 layers, 4 experts (top-2) of width 256 (qwen2_moe: shared expert 256), 4 heads / 2 kv heads of 64, vocab 512 |
| `deepseek_v3-bf16.gguf` (+ `.golden.safetensors`, `.json`) | `tests/fixtures/deepseek_v3` as llama.cpp arch `deepseek2`, built and documented by `scripts/make_gguf_bf16_fixtures.py` (not by this script, whose checks skip it) | as there |
| `glm4_moe-bf16.gguf` (+ `.golden.safetensors`, `.json`) | `tests/fixtures/glm4_moe` as llama.cpp arch `glm4moe`, built and documented by `scripts/make_gguf_bf16_fixtures.py` (likewise) | as there |
| `gpt_oss-bf16.gguf` (+ `.golden.safetensors`, `.json`) | `tests/fixtures/gpt_oss` as llama.cpp arch `gpt-oss` (experts in BF16), built and documented by `scripts/make_gguf_bf16_fixtures.py` (likewise) | as there |
| `glm4_moe-q8_0.gguf` | `glm4_moe-bf16.gguf` quantized to Q8_0 by llama.cpp (no golden: the daemon's chat test reads it), by `scripts/make_gguf_bf16_fixtures.py` (likewise) | as there |
| `gpt_oss-q8_0.gguf`, `gpt_oss-mxfp4.gguf` (+ `.golden.safetensors`) | `gpt_oss-bf16.gguf` quantized by llama.cpp to Q8_0, and to MXFP4 experts with Q8_0 elsewhere, with llama.cpp's logits on each, by `scripts/make_gguf_bf16_fixtures.py` (likewise) | as there |

## Layout notes

* GGUF dims are listed as stored (`ne[0]` first): a matrix `[in, out]` is the transpose of its
  numpy / PyTorch shape `[out, in]`; stacked experts are `[in, out, E]` (numpy `[E, out, in]`),
  expert e being the e-th `[out, in]` slab.
* Experts are stacked per layer in every architecture: `ffn_gate_exps`, `ffn_up_exps`
  `[H, I, E]`, `ffn_down_exps` `[I, H, E]`; the router `ffn_gate_inp` is `[H, E]`. The
  quantizer never quantizes routers (`ffn_gate_inp.weight`), norms or 1-D tensors: they stay F32.
* qwen2moe adds the shared expert `ffn_gate_shexp`, `ffn_up_shexp` `[H, S]`,
  `ffn_down_shexp` `[S, H]` and its sigmoid gate `ffn_gate_inp_shexp`, which is `[H, 1]` in the
  converter's f32 file but `[H]` in every quantized file (llama.cpp drops trailing dims of 1 when
  it rewrites a file; being 1-D it stays F32). Attention biases: `attn_q.bias`, `attn_k.bias`,
  `attn_v.bias`. `feed_forward_length` is the (unused) dense width; the expert widths are
  `expert_feed_forward_length` and `expert_shared_feed_forward_length`.
* qwen3moe: q/k RMSNorm `attn_q_norm`, `attn_k_norm` `[head_dim]`, applied per head before rope;
  `attention.key_length` / `value_length` carry head_dim (32 in the hidden-64 fixture, where
  it differs from H / heads = 16). Tied embeddings: there is no `output.weight` and llama.cpp
  uses `token_embd.weight` as the output matrix; the quantizer then treats `token_embd` as the
  output (Q6_K in Q4_K_M, where an untied `token_embd` is Q4_K).
* Mixtral converts as architecture `llama`, marked as MoE only by `llama.expert_count` /
  `llama.expert_used_count`; `llama.feed_forward_length` is the expert width (there is no
  `expert_feed_forward_length`). HF `w1` / `w3` / `w2` become `ffn_gate_exps` / `ffn_up_exps` /
  `ffn_down_exps`, the router `block_sparse_moe.gate` becomes `ffn_gate_inp`. `attn_q` and
  `attn_k` rows are permuted relative to Hugging Face: within each head (`head_count` heads for
  q, `head_count_kv` for k), llama.cpp's `permute` turns the rotate-half row order into
  interleaved pairs, GGUF row `2j + c` = HF row `j + c * head_dim / 2` (c in {{0, 1}},
  j < head_dim / 2); llama.cpp then applies rope to adjacent pairs. Qwen tensors are not
  permuted (qwen2moe / qwen3moe use NEOX-style rope on unpermuted rows). Mixtral also writes
  `llama.vocab_size` and `llama.rope.dimension_count`.
* Layer norms: `attn_norm` (HF `input_layernorm`), `ffn_norm` (HF `post_attention_layernorm`),
  final `output_norm` (HF `model.norm`); `token_embd` = `model.embed_tokens`, `output` = `lm_head`.
* Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 need rows (`ne[0]`) that are a multiple of 32, K-quants a
  multiple of 256; otherwise llama.cpp silently falls back to another type. The script checks
  every tensor's type; the only fallback of that kind present is `mixtral-q8_0.gguf`'s
  `ffn_down_exps` (rows of 48), stored as F16.
* `qwen3_moe-q4_0`, `-q4_1`, `-q5_0`, `-q5_1.gguf` hold the file's type only in `attn_q`,
  `attn_output` and `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`; llama.cpp stores the
  rest of the quantized tensors as Q8_0: `token_embd` (the tied output matrix, asked as Q6_K,
  whose 256-value rows do not divide 64) and every layer's `attn_k` and `attn_v` (llama.cpp
  bumps them to Q8_0 in any model with exactly 8 experts).
* Q4_K_M is a mixture by design: Q6_K for the output matrix and, in some layers
  (`use_more_bits`: here layer 1 of 2), for `attn_v` and `ffn_down_exps` / `ffn_down_shexp`.
* Tensor order in the files is not canonical (it differs between the converter's and the
  quantizer's output); look tensors up by name.
"""


def fmt_meta(f):
    import gguf

    c = f.contents()
    if isinstance(c, list):
        return f"[{len(c)} x {gguf.GGUFValueType(f.types[-1]).name}]"
    if isinstance(c, str):
        return json.dumps(c if len(c) <= 24 else c[:21] + "...").replace("|", "\\|")
    if isinstance(c, float):
        return f"{c:g}"
    return str(c)


def gguf_facts(path: Path):
    """(metadata {key: (type, shown)}, tensors {name: (dims, type)}) of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {
        k: (gguf.GGUFValueType(f.types[0]).name, fmt_meta(f)) for k, f in r.fields.items() if not k.startswith("GGUF.")
    }
    tensors = {t.name: ([int(d) for d in t.shape], t.tensor_type.name) for t in r.tensors}
    return meta, tensors


KIND_ORDER = ["f32"] + SMALL_QUANTS + BLOCK32_QUANTS + ["k-f32"] + [f"k-{q}" for q in K_QUANTS]


def file_order(name):
    """qwen2_moe, qwen3_moe, mixtral; then f32, q8_0, q4_0-q5_1, the K files; goldens after their GGUF."""
    m = re.match(rf"(\w+?)-(k-)?({QTYPE_RE})\.", name)
    if not m:
        return (9, 0, name)
    return (SMALL.index(m.group(1)), KIND_ORDER.index((m.group(2) or "") + m.group(3)), name)


ARCH_GROUPS = [
    ("qwen2_moe", "Qwen2-MoE (`qwen2moe`)"),
    ("qwen3_moe", "Qwen3-MoE (`qwen3moe`)"),
    ("mixtral", "Mixtral (`llama` with experts)"),
]


def render_readme(summary):
    import llama_cpp

    lines = [README_HEAD.format(llama_cpp_python=llama_cpp.__version__, gguf=summary["versions"]["gguf"])]
    lines.append("## Files\n")
    lines.append("| file | bytes | general.architecture | tensors |")
    lines.append("|------|------:|----------------------|--------:|")
    for f in sorted(fixture_files(), key=lambda f: file_order(str(f.relative_to(OUT)))):
        if f.name != "README.md":
            rec = summary["files"].get(str(f.relative_to(OUT)), {})
            lines.append(f"| `{f.relative_to(OUT)}` | {f.stat().st_size} | {rec.get('arch', '')} | {rec.get('tensors', '')} |")
    lines.append(f"\nTotal with this README: {summary['total_bytes']} bytes ({summary['total_bytes'] / 1e6:.2f} MB).\n")

    lines.append("## Measured differences\n")
    lines.append(
        "Max |a - b| over the 12 x 512 prompt logits (the logits' std is ~2). `llama` = llama.cpp "
        "(f32 KV cache, 2 threads), `dequant` = transformers float32 on the dequantized weights, "
        "`hf` = transformers on the Hugging Face checkpoint (`tests/fixtures/<arch>/golden.safetensors`, "
        "or the K checkpoint the script rebuilds). Margins: smallest top-k routing probability gap and "
        "smallest top-1/top-2 greedy logit gap on the dequantized weights; `prefix`: how many of the 16 "
        "greedy tokens llama.cpp and the dequantized model share. The f32 rows of the K models are for "
        "their uncommitted f32 GGUF.\n"
    )
    lines.append("| file | llama-hf | dequant-hf | llama-dequant | prefix | dequant routing = hf | routing margin | greedy margin |")
    lines.append("|------|---------:|-----------:|--------------:|------:|:---:|---:|---:|")
    rows = [(n, r) for n, r in summary["files"].items() if "llama_vs_hf_logits" in r]
    for src, info in summary["sources"].items():
        if "f32_gguf_checks" in info:
            rows.append((f"{src}-f32.gguf", info["f32_gguf_checks"]))
    rows.sort(key=lambda nr: file_order(nr[0]))
    for n, r in rows:
        lines.append(
            f"| `{n}` | {r['llama_vs_hf_logits']:.2e} | {r['dequant_vs_hf_logits']:.2e} | "
            f"{r['llama_vs_dequant_logits']:.2e} | {r['llama_dequant_greedy_common_prefix']} | "
            f"{'yes' if r['dequant_routing_equals_hf'] else 'no'} | {r['dequant_min_routing_margin']:.3g} | "
            f"{r['dequant_min_greedy_margin']:.3g} |"
        )
    lines.append("")

    lines.append("## Metadata and tensors per architecture\n")
    lines.append(
        "Metadata: every key (arrays as `[count x element type]`, long strings cut). Tensors: those "
        "outside the blocks and those of layer 0, as `[GGUF dims] type`; the other layers have the "
        "same names and dims, and the same types except where listed.\n"
    )
    for arch, title in ARCH_GROUPS:
        files = sorted(OUT.glob(f"{arch}-*.gguf"), key=lambda f: file_order(f.name))
        if not files:
            continue
        facts = [gguf_facts(f) for f in files]
        lines.append(f"### {title}\n")
        head = " | ".join(f"`{f.name[:-5]}`" for f in files)
        lines.append(f"| key | type | {head} |")
        lines.append("|-----|------|" + "---|" * len(files))
        keys = []
        for meta, _ in facts:
            keys += [k for k in meta if k not in keys]
        for k in keys:
            ty = next(m[k][0] for m, _ in facts if k in m)
            vals = " | ".join(m[k][1] if k in m else "(absent)" for m, _ in facts)
            lines.append(f"| `{k}` | {ty} | {vals} |")
        lines.append("")
        lines.append(f"| tensor | {head} |")
        lines.append("|--------|" + "---|" * len(files))
        names = []
        for _, ts in facts:
            names += [n for n in ts if (not n.startswith("blk.") or n.startswith("blk.0.")) and n not in names]
        block = sorted(n for n in names if n.startswith("blk."))
        for n in [n for n in names if not n.startswith("blk.")] + block:
            vals = " | ".join(f"{ts[n][0]} {ts[n][1]}" if n in ts else "(absent)" for _, ts in facts)
            lines.append(f"| `{n}` | {vals} |")
        lines.append("")
        diffs = []
        for f, (_, ts) in zip(files, facts):
            for n, (dims, ty) in ts.items():
                m = re.fullmatch(r"blk\.(\d+)\.(.+)", n)
                if m and m.group(1) != "0" and ts[f"blk.0.{m.group(2)}"][1] != ty:
                    diffs.append(f"`{f.name}`: `{n}` {ty}")
        if diffs:
            lines.append("Other layers with another type than layer 0: " + "; ".join(diffs) + ".\n")

    f32_max = max(r["llama_vs_hf_logits"] for n, r in rows if n.endswith("-f32.gguf"))
    q = [r["llama_vs_dequant_logits"] for n, r in rows if not n.endswith("-f32.gguf")]
    rms = [r["llama_vs_dequant_logits_rms"] for n, r in rows if not n.endswith("-f32.gguf")]
    lines.append(README_GOLDENS.format(
        f32_max=f"{f32_max:.1e}", q_min=f"{min(q):.2f}", q_max=f"{max(q):.2f}",
        rms_min=f"{min(rms):.2f}", rms_max=f"{max(rms):.2f}",
    ))
    lines.append(README_VOCAB)
    lines.append("| file | bytes | tokenizer.ggml.model | tokenizer.ggml.pre | tokens | tests |")
    lines.append("|------|------:|----------------------|--------------------|-------:|------:|")
    for v, info in summary["vocab"].items():
        lines.append(
            f"| `vocab/ggml-vocab-{v}.gguf` | {info['bytes']} | {info['tokenizer.ggml.model']} | "
            f"{info['tokenizer.ggml.pre']} | {info['n_tokens']} | {info['tests']} |"
        )
    lines.append("")
    left = [(v, i) for v, i in sorted(summary.get("vocab_candidates", {}).items()) if v not in summary["vocab"]]
    if left:
        why = {
            "gpt2": f"BPE; does not fit the {BUDGET // 1_000_000} MB budget next to the model fixtures",
            "llama": "SentencePiece; llama-spm covers that path",
        }
        lines.append("Not kept, among the vocabularies with test vectors in llama.cpp's `models/`:\n")
        lines.append("| file | bytes | tokenizer.ggml.model | tokenizer.ggml.pre | why |")
        lines.append("|------|------:|----------------------|--------------------|-----|")
        for v, i in left:
            lines.append(
                f"| `ggml-vocab-{v}.gguf` | {i['bytes']} | {i['tokenizer.ggml.model']} | {i['tokenizer.ggml.pre']} | "
                f"{why.get(i['tokenizer.ggml.model'], 'neither BPE nor SentencePiece')} |"
            )
        lines.append("")
    (OUT / "README.md").write_text("\n".join(lines))


README_GOLDENS = """\
## Goldens (`<file>.golden.safetensors`)

T = 12 prompt tokens, V = 512, L layers, k experts per token.

| name | dtype, shape | meaning |
|------|--------------|---------|
| `input_ids` | I64 [T] | prompt of non-special ids; for `<arch>-*` the same ids as `tests/fixtures/<arch>/golden.safetensors` |
| `llama_logits` | F32 [T, V] | llama.cpp logits of one batch over `input_ids`, every position (`logits_all`, f32 KV cache `type_k = type_v = 0`, n_ctx 64, 2 threads, no flash attention) |
| `llama_greedy` | I64 [16] | llama.cpp greedy continuation after `input_ids` (argmax, KV cache, no eos stop) |
| `dequant_logits` | F32 [T, V] | transformers in float32 (eager attention) with every tensor dequantized by `gguf.quants.dequantize` and mapped back to Hugging Face names (Mixtral q/k rows un-permuted) |
| `dequant_routing_ids` | I64 [L, T, k] | experts selected on the dequantized weights, in `torch.topk` order (descending probability) |
| `dequant_greedy` | I64 [16] | greedy continuation on the dequantized weights (KV cache, checked step by step by full recompute) |

For the f32 files the dequantized weights are exactly the checkpoint's bf16 values, so the
`dequant_*` tensors equal the Hugging Face goldens (`logits`, `routing_ids`, `greedy_tokens`)
bit for bit, and llama.cpp's logits agree with them within {f32_max}. For the quantized files
`dequant_*` is the exact f32 answer an engine that dequantizes the weights should reproduce (up
to f32 summation order); `llama_logits` differ from it by {q_min}-{q_max} (max over the file's
logits; rms {rms_min}-{rms_max}, see `gguf.json`) because llama.cpp quantizes the activations
too (to Q8_0 / Q8_1 / Q8_K blocks) inside its quantized dot products, which moves the logits by
up to ~0.3. The two larger maxima are one position each where that perturbation flips a routing
decision in llama.cpp: `qwen3_moe-q4_1` at position 5 and `qwen3_moe-q5_0` at position 8, where
llama.cpp's last layer takes the expert the dequantized model ranks fourth instead of its third
(their probability gap on the dequantized weights: 0.0036 and 0.0031); with those two swapped at
that position the dequantized model agrees with llama.cpp within 0.14 there too. These tiny random
models amplify perturbations (a weight quantization error flips routing decisions relative to
the bf16 checkpoint), so compare quantized runs with the golden of the same file, never with
the checkpoint's. The K models' seeds were chosen so that, on the dequantized weights of both
quantized files, every routing gap is >= 2e-3 and every greedy margin >= 1e-2, and llama.cpp
stays within 0.75 of the dequantized logits (no flipped routing on the prompt); llama.cpp's
greedy tokens may still part from the dequantized ones after a few tokens (`prefix` above).
"""

README_VOCAB = """\
## Tokenizer test vectors (`vocab/`)

Copied unchanged from llama.cpp's `models/` directory, where `tests/test-tokenizer-0` uses them:
`ggml-vocab-<name>.gguf` is a vocab-only GGUF (metadata only: `general.*`, the architecture's
hyper-parameters and `tokenizer.ggml.*`; no tensors), and `ggml-vocab-<name>.gguf.inp` /
`.gguf.out` are its test vectors:

* `.inp` (UTF-8): each test text followed by the separator line, i.e. the text, then
  `\\n__ggml_vocab_test__\\n` (newline, `__ggml_vocab_test__`, newline), including after the last
  text. Split the whole file on `"\\n__ggml_vocab_test__\\n"` and drop the final empty piece. Texts
  are byte-exact: they may be empty, contain newlines and tabs, or start/end with spaces.
* `.out`: one line per text, same order, each ending in `\\n`. A line is the expected token ids
  in decimal, each preceded by one space (` 9906 1917`); an empty line is an empty encoding.
  Strip the line and split it on spaces. The number of lines equals the number of texts (46).
* The ids are the Hugging Face tokenizer's `encode(text, add_special_tokens=False)`: no BOS/EOS is
  added and special-token text is tokenized as plain text; llama.cpp reproduces them with
  `llama_tokenize(vocab, text, add_special = false, parse_special = false)`. For the
  SentencePiece vocabulary that still includes the leading-space prefix (`add_space_prefix`):
  `"Hello"` -> `▁Hello`.

The script checks that llama.cpp itself reproduces every vector of each file kept here.
"""


# ----------------------------------------------------------------------------- main


def fixture_files():
    """Every file under OUT except those git ignores (the engine's `*.odmoe-checksums` caches,
    written next to a GGUF file when tests load it)."""
    files = sorted(p for p in OUT.rglob("*") if p.is_file())
    try:
        r = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "--stdin", "-z"],
            input="\0".join(map(str, files)), capture_output=True, text=True,
        )
        ignored = set(r.stdout.split("\0")) if r.returncode in (0, 1) else set()
    except OSError:
        ignored = set()
    return [p for p in files if str(p) not in ignored]


def dir_bytes():
    return sum(p.stat().st_size for p in fixture_files())


def build(names_small, names_k, vocab):
    import gguf
    import llama_cpp
    import transformers

    check_versions()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "gguf.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("files", {})
    summary.setdefault("sources", {})
    summary.setdefault("vocab", {})
    tok, special_ids = mf.build_tokenizer()
    # Binary files, and test vectors that must stay byte-exact (no end-of-line conversion).
    (OUT / ".gitattributes").write_text("*.gguf binary\n*.safetensors binary\n*.inp -text\n*.out -text\n")

    for arch in names_small:
        build_small(arch, summary)
    for arch in names_k:
        build_k(arch, tok, special_ids, summary)
    if vocab:
        summary["vocab"] = {}
        copy_vocabs(summary)

    for f in sorted(OUT.glob("*.gguf")):
        if f.name in OTHER_SCRIPTS:  # recorded in its own .json by that script
            continue
        rec = summary["files"].setdefault(f.name, {})
        m = re.fullmatch(rf"(\w+?)(-k)?-({QTYPE_RE})\.gguf", f.name)
        reader = gguf.GGUFReader(f)
        rec["arch"] = reader.fields["general.architecture"].contents()
        rec["tensors"] = len(reader.tensors)
        rec["source"] = (
            f"tests/fixtures/{m.group(1)}" if not m.group(2) else f"{m.group(1)}-k (built by the script)"
        )
        rec.update(file_record(f))
        g = golden_path(f)
        summary["files"][g.name] = {"source": f.name, **file_record(g)}
    for v in summary["vocab"]:
        for suffix in ("", ".inp", ".out"):
            p = VOCAB_OUT / f"ggml-vocab-{v}.gguf{suffix}"
            summary["files"][f"vocab/{p.name}"] = file_record(p)
    summary["files"] = {k: v for k, v in sorted(summary["files"].items()) if (OUT / k).exists()}
    summary["versions"] = {
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": getattr(gguf, "__version__", None) or __import__("importlib.metadata").metadata.version("gguf"),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    summary["thresholds"] = {
        "f32_llama_vs_hf": TOL_F32_LLAMA,
        "f32_dequant_vs_hf": TOL_F32_DEQUANT,
        "k_min_quant_routing_gap": K_MIN_QUANT_ROUTING_GAP,
        "k_min_quant_greedy_margin": K_MIN_QUANT_GREEDY_MARGIN,
        "k_max_llama_vs_dequant": K_MAX_LLAMA_VS_DEQUANT,
    }
    summary["total_bytes"] = 0
    mf.write_json(summary_path, summary)
    render_readme(summary)
    for _ in range(3):  # the sizes listed in README/json change the sizes of README/json
        summary["total_bytes"] = dir_bytes()
        mf.write_json(summary_path, summary)
        render_readme(summary)
    total = dir_bytes()
    print(f"tests/fixtures/gguf: {total} bytes ({total / 1e6:.2f} MB)")
    if total > BUDGET:
        raise SystemExit(f"tests/fixtures/gguf exceeds {BUDGET} bytes")


def verify():
    """Fresh-process check: recompute every golden from the committed GGUF files."""
    from safetensors.torch import load_file

    check_versions()
    torch.set_num_threads(1)
    summary = json.loads((OUT / "gguf.json").read_text())
    tok, special_ids = mf.build_tokenizer()
    ok = True
    for f in sorted(OUT.glob("*.gguf")):
        if f.name in OTHER_SCRIPTS:
            print(f"== {f.name}: built and checked by {OTHER_SCRIPTS[f.name]}")
            continue
        gold = load_file(str(golden_path(f)))
        m = re.fullmatch(rf"(\w+?)(-k)?-({QTYPE_RE})\.gguf", f.name)
        arch, is_k, qtype = m.groups()
        if qtype != "f32":
            check_types(f, qtype)
        spec_name = k_name(arch) if is_k else arch
        hf_dir = (WORK / "hf" / spec_name) if is_k else FIXTURES / arch
        if is_k and not (hf_dir / "config.json").exists():
            # The K checkpoints are not committed: rebuild from the recorded seed.
            seed = summary["sources"][spec_name]["seed"]
            got, hf_dir, ids, _ = build_k_checkpoint(arch, tok, special_ids, seed)
            assert got == seed and torch.equal(ids, gold["input_ids"]), f"{spec_name}: rebuild differs"
        lg, gl, _ = llama_goldens(f, gold["input_ids"])
        dq = dequant_goldens(f, hf_dir, spec_name, gold["input_ids"])
        d_llama = maxdiff(lg, gold["llama_logits"])
        d_dq = maxdiff(dq["logits"], gold["dequant_logits"])
        same = (
            torch.equal(gl, gold["llama_greedy"])
            and torch.equal(dq["routing_ids"], gold["dequant_routing_ids"])
            and torch.equal(dq["greedy_tokens"], gold["dequant_greedy"])
        )
        sha_ok = file_record(f)["sha256"] == summary["files"][f.name]["sha256"]
        good = d_llama <= 1e-6 and d_dq <= 1e-6 and same and sha_ok
        ok &= good
        print(
            f"== {f.name}: {'OK' if good else 'FAILED'} (llama logits {d_llama:.1e}, dequant logits {d_dq:.1e}, "
            f"ids equal {same}, sha256 equal {sha_ok})",
            flush=True,
        )
    for v in summary["vocab"]:
        info = check_vocab(VOCAB_OUT / f"ggml-vocab-{v}.gguf")
        good = info["llama_cpp_mismatches"] == 0 and info["tests"] == summary["vocab"][v]["tests"]
        ok &= good
        for suffix in ("", ".inp", ".out"):
            name = f"vocab/ggml-vocab-{v}.gguf{suffix}"
            good &= file_record(OUT / name)["sha256"] == summary["files"][name]["sha256"]
        ok &= good
        print(f"== vocab {v}: {'OK' if good else 'FAILED'} ({info['tests']} tests reproduced by llama.cpp, sha256)")
    total = dir_bytes()
    print(f"tests/fixtures/gguf: {total} bytes ({total / 1e6:.2f} MB)")
    ok &= total <= BUDGET
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verify", action="store_true", help="only verify the committed fixtures")
    ap.add_argument("--small", nargs="*", default=None, help="hidden-64 fixtures to build (default: all)")
    ap.add_argument("--k", nargs="*", default=None, help="K-quant fixtures to build (default: all)")
    ap.add_argument("--no-vocab", action="store_true", help="do not (re)copy the vocab files")
    args = ap.parse_args()
    if args.verify:
        sys.exit(0 if verify() else 1)
    small = SMALL if args.small is None else args.small
    kk = SMALL if args.k is None else args.k
    for n in small + kk:
        if n not in SMALL:
            raise SystemExit(f"unknown architecture {n}; known: {', '.join(SMALL)}")
    build(small, kk, not args.no_vocab)
    rc = subprocess.call([sys.executable, __file__, "--verify"])
    sys.exit(rc)


if __name__ == "__main__":
    main()
