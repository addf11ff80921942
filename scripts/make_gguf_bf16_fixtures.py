#!/usr/bin/env python3
"""Build the BF16 GGUF fixtures of tests/fixtures/gguf and their goldens:

* ``deepseek_v3-bf16.gguf`` (llama.cpp arch ``deepseek2``) from tests/fixtures/deepseek_v3;
* ``glm4_moe-bf16.gguf`` (llama.cpp arch ``glm4moe``) from tests/fixtures/glm4_moe;
* ``gpt_oss-bf16.gguf`` (llama.cpp arch ``gpt-oss``) from tests/fixtures/gpt_oss, its experts in
  BF16 rather than MXFP4 (the converter splits gate_up_proj into gate and up as it does the MXFP4
  blocks).

Each is converted by the llama.cpp converter pinned in make_gguf_fixtures.py. What differs from a
plain conversion, each because the GGUF could not otherwise mean the same model:

* DeepSeek-V3: ``scoring_func: "sigmoid"`` and ``topk_method: "noaux_tc"`` are added to the
  config handed to the converter. Hub DeepSeek-V3 configs carry them; transformers 5 drops them
  on save, and without ``expert_gating_func`` in the GGUF llama.cpp routes a deepseek2 model with
  softmax.
* DeepSeek-V3: YaRN ``mscale`` is set to ``mscale_all_dim`` (0.8). The converter writes only
  ``rope.scaling.yarn_log_multiplier`` (0.1 * mscale_all_dim); llama.cpp then scales cos and sin
  by 1, which is what transformers computes exactly when mscale == mscale_all_dim (as in every
  real DeepSeek-V3 and Kimi-K2 config). The checkpoint's fixture uses mscale 1.0 on purpose, to
  exercise that path; a GGUF cannot say it, so the GGUF's golden is transformers on the same
  weights with mscale 0.8 (``hf_*`` below), not tests/fixtures/deepseek_v3/golden.safetensors.
* GLM-4.5: the converter's GLM vocabulary writer looks up GLM's own special tokens
  (``[gMASK]``, ``<|user|>``, ...), which the fixtures' shared tokenizer does not have; the
  plain GPT-2 writer is used instead (see make_gguf_fixtures.CONVERT_WRAPPER). The weights and
  the model config are converted as they are.
* GLM-4.5 is also quantized to ``glm4_moe-q8_0.gguf`` (no golden): every matrix then goes
  through the quantized kernels, whose rows do not depend on how many tokens a pass takes, as
  the daemon's chat test needs (candle's f32 products of BF16 weights do).
* gpt-oss is also quantized by llama.cpp's quantizer from the BF16 file: ``gpt_oss-q8_0.gguf``
  (every matrix Q8_0, experts included), so that its biased, clamped experts run through the
  quantized kernels, and ``gpt_oss-mxfp4.gguf`` (routed experts in MXFP4, the type gpt-oss's
  released files use, the other matrices Q8_0). Their goldens hold llama.cpp's logits and
  greedy tokens on each file (``llama_logits``, ``llama_greedy``) and the input ids.
* The files are BF16, not F32: an F32 file is about 1 MB, more than tests/fixtures/gguf's budget
  has left (see make_gguf_fixtures.BUDGET). The checkpoints are bf16 (checked below), so a BF16
  file holds exactly the numbers an F32 one would (F16 would not: some embedding values are
  below f16's normal range). llama.cpp's logits are taken from that F32 conversion (not
  committed), because llama.cpp rounds activations to bf16 inside BF16 matmuls; its logits on
  the BF16 file are only summarised in the json. Q8_0 is not built: DeepSeek's q_lora_rank 48
  and k_b rows of 16 are not multiples of 32, and neither would fit the budget.

Golden tensors (``<name>-bf16.golden.safetensors``), T = 12 prompt tokens, V = 512:

    input_ids         I64 [T]        the prompt of tests/fixtures/<name>/golden.safetensors
    hf_logits         F32 [T, V]     transformers float32, eager attention (DeepSeek: mscale 0.8)
    hf_routing_ids    I64 [L, T, k]  experts chosen there (-1 in dense layers)
    hf_greedy         I64 [16]       greedy continuation there
    llama_logits      F32 [T, V]     llama.cpp on the F32 conversion, f32 KV cache
    llama_greedy      I64 [16]       llama.cpp greedy continuation

Run with the reference venv: ``~/.cache/odmoe/refvenv/bin/python scripts/make_gguf_bf16_fixtures.py
[deepseek_v3] [glm4_moe] [gpt_oss]`` (all when none is named).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gguf_fixtures as mg  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

mf = mg.mf
TOL_HF = 1e-4  # llama.cpp (f32 weights, f32 KV cache) vs transformers


def deepseek_config(cfg):
    cfg["scoring_func"] = "sigmoid"
    cfg["topk_method"] = "noaux_tc"
    rope = cfg["rope_parameters"]
    rope["mscale"] = rope["mscale_all_dim"]
    return "tests/fixtures/deepseek_v3 (scoring_func sigmoid, topk_method noaux_tc, mscale 0.8)"


def as_it_is(name):
    return lambda cfg: f"tests/fixtures/{name} (as it is)"


# name -> (transformers class, change to the config handed to the converter, most |llama.cpp -
# transformers| allowed). gpt-oss: llama.cpp rounds YaRN's correction range outwards to whole
# dimensions, which gpt-oss's config (`truncate: false`, every released one) says not to do, and
# a GGUF has no key to say it; with truncate true transformers agrees with llama.cpp to 2.2e-5.
SOURCES = {
    "deepseek_v3": ("DeepseekV3ForCausalLM", deepseek_config, TOL_HF),
    "glm4_moe": ("Glm4MoeForCausalLM", as_it_is("glm4_moe"), TOL_HF),
    "gpt_oss": ("GptOssForCausalLM", as_it_is("gpt_oss"), 0.05),
}


def patched_checkpoint(name) -> tuple[Path, str]:
    d = mg.WORK / f"{name}-gguf-src"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(mf.FIXTURES / name, d)
    cfg = json.loads((d / "config.json").read_text())
    source = SOURCES[name][1](cfg)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d, source


def check_bf16(hf_dir: Path):
    from safetensors.torch import load_file

    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if t.dtype != torch.bfloat16:
            raise SystemExit(f"{name} is {t.dtype}; a BF16 GGUF would change the model")


def hf_goldens(name, hf_dir: Path, ids):
    import transformers

    cls = getattr(transformers, SOURCES[name][0])
    model = cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return mf.goldens_for(model, name, ids)


def build(name):
    from safetensors.torch import load_file, save_file

    out = mg.OUT / f"{name}-bf16.gguf"
    hf_dir, source = patched_checkpoint(name)
    check_bf16(hf_dir)
    original = load_file(str(mf.FIXTURES / name / "golden.safetensors"))
    ids = original["input_ids"]
    f32 = mg.WORK / f"{name}-f32.gguf"
    mg.convert(hf_dir, f32, f"odmoe-{name}-tiny", "f32")
    mg.check_f32(f32)
    mg.convert(hf_dir, out, f"odmoe-{name}-tiny", "bf16")
    os.chmod(out, 0o644)
    hf = hf_goldens(name, hf_dir, ids)
    lg, greedy, margin = mg.llama_goldens(f32, ids)
    lg_bf16, greedy_bf16, _ = mg.llama_goldens(out, ids)
    golden = mg.golden_path(out)
    save_file(
        {
            "input_ids": torch.as_tensor(ids, dtype=torch.int64).contiguous(),
            "hf_logits": hf["logits"].contiguous(),
            "hf_routing_ids": hf["routing_ids"].contiguous(),
            "hf_greedy": hf["greedy_tokens"].contiguous(),
            "llama_logits": lg.contiguous(),
            "llama_greedy": greedy.contiguous(),
        },
        str(golden),
        metadata={"format": "pt"},
    )
    os.chmod(golden, 0o644)
    record = {
        "source": source,
        "bytes": out.stat().st_size,
        "golden_bytes": golden.stat().st_size,
        "sha256": mg.hashlib.sha256(out.read_bytes()).hexdigest(),
        "llama_f32_vs_hf_logits": mg.maxdiff(lg, hf["logits"]),
        "llama_bf16_vs_hf_logits": mg.maxdiff(lg_bf16, hf["logits"]),
        "llama_greedy_equals_hf": bool(torch.equal(greedy, hf["greedy_tokens"])),
        "llama_bf16_greedy_equals_hf": bool(torch.equal(greedy_bf16, hf["greedy_tokens"])),
        "llama_min_greedy_margin": round(margin, 6),
        "hf_min_greedy_margin": round(float(hf["greedy_margin"]), 6),
        "hf_vs_checkpoint_golden_logits": mg.maxdiff(hf["logits"], original["logits"]),
    }
    summary = mg.OUT / f"{name}-bf16.json"
    summary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps(record, indent=2))
    if name == "gpt_oss":
        quantized_gpt_oss(out, ids)
    if name == "glm4_moe":
        q8_0 = mg.OUT / "glm4_moe-q8_0.gguf"
        mg.quantize(out, q8_0, "q8_0")
        os.chmod(q8_0, 0o644)
    if record["llama_f32_vs_hf_logits"] > SOURCES[name][2]:
        raise SystemExit(f"{name}: llama.cpp and transformers differ by {record['llama_f32_vs_hf_logits']}")
    if not record["llama_greedy_equals_hf"]:
        raise SystemExit(f"{name}: llama.cpp's greedy tokens differ from transformers'")


# llama.cpp's file type with routed experts in MXFP4 and the other matrices in Q8_0.
MOSTLY_MXFP4_MOE = 38


def quantized_gpt_oss(bf16: Path, ids):
    """gpt_oss-q8_0.gguf and gpt_oss-mxfp4.gguf from the BF16 file, with llama.cpp's logits and
    greedy tokens on each."""
    import ctypes

    import llama_cpp

    for kind in ("q8_0", "mxfp4"):
        out = mg.OUT / f"gpt_oss-{kind}.gguf"
        if kind == "q8_0":
            mg.quantize(bf16, out, "q8_0")
        else:
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = MOSTLY_MXFP4_MOE
            if llama_cpp.llama_model_quantize(str(bf16).encode(), str(out).encode(), ctypes.byref(p)) != 0:
                raise SystemExit("llama_model_quantize to MXFP4 failed")
        os.chmod(out, 0o644)
        llama_golden(out, ids)


def llama_golden(out: Path, ids):
    """llama.cpp's logits and greedy tokens on `out`, beside it."""
    from safetensors.torch import save_file

    lg, greedy, margin = mg.llama_goldens(out, ids)
    golden = mg.golden_path(out)
    save_file(
        {
            "input_ids": torch.as_tensor(ids, dtype=torch.int64).contiguous(),
            "llama_logits": lg.contiguous(),
            "llama_greedy": greedy.contiguous(),
        },
        str(golden),
        metadata={"format": "pt"},
    )
    os.chmod(golden, 0o644)
    print(f"{out.name}: {out.stat().st_size} bytes, llama.cpp min greedy margin {margin:.4g}")


def main():
    names = sys.argv[1:] or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise SystemExit(f"unknown fixture {unknown}; known: {', '.join(SOURCES)}")
    mg.check_versions()
    for name in names:
        build(name)
    if mg.dir_bytes() > mg.BUDGET:
        raise SystemExit(f"tests/fixtures/gguf is {mg.dir_bytes()} bytes, over {mg.BUDGET}")


if __name__ == "__main__":
    main()
