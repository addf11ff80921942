#!/usr/bin/env python3
"""Build tests/fixtures/gguf/deepseek_v3-bf16.gguf (llama.cpp arch ``deepseek2``) and its goldens.

The source is the tiny DeepSeek-V3 checkpoint in tests/fixtures/deepseek_v3, converted by the
llama.cpp converter pinned in make_gguf_fixtures.py. Three things differ from a plain conversion,
each because the GGUF could not otherwise mean the same model:

* ``scoring_func: "sigmoid"`` and ``topk_method: "noaux_tc"`` are added to the config handed to
  the converter. Hub DeepSeek-V3 configs carry them; transformers 5 drops them on save, and
  without ``expert_gating_func`` in the GGUF llama.cpp routes a deepseek2 model with softmax.
* YaRN ``mscale`` is set to ``mscale_all_dim`` (0.8). The converter writes only
  ``rope.scaling.yarn_log_multiplier`` (0.1 * mscale_all_dim); llama.cpp then scales cos and sin
  by 1, which is what transformers computes exactly when mscale == mscale_all_dim (as in every
  real DeepSeek-V3 and Kimi-K2 config). The checkpoint's fixture uses mscale 1.0 on purpose, to
  exercise that path; a GGUF cannot say it, so the GGUF's golden is transformers on the same
  weights with mscale 0.8 (``hf_*`` below), not tests/fixtures/deepseek_v3/golden.safetensors.
* The file is BF16, not F32: an F32 file is 1.05 MB, more than tests/fixtures/gguf's budget has
  left (see make_gguf_fixtures.BUDGET). The checkpoint is bf16 (checked below), so the BF16 file
  holds exactly the numbers an F32 one would (F16 would not: some embedding values are below
  f16's normal range). llama.cpp's logits are taken from that F32 conversion (not committed),
  because llama.cpp rounds activations to bf16 inside BF16 matmuls; its logits on the BF16 file
  are only summarised in the json. Q8_0 is not built: q_lora_rank 48 and the k_b rows of 16 are
  not multiples of 32, and it would not fit the budget either.

Golden tensors (``deepseek_v3-bf16.golden.safetensors``), T = 12 prompt tokens, V = 512:

    input_ids         I64 [T]        the prompt of tests/fixtures/deepseek_v3/golden.safetensors
    hf_logits         F32 [T, V]     transformers float32, eager attention, mscale 0.8
    hf_routing_ids    I64 [L, T, k]  experts chosen there (MoE layers only)
    hf_greedy         I64 [16]       greedy continuation there
    llama_logits      F32 [T, V]     llama.cpp on the F32 conversion, f32 KV cache
    llama_greedy      I64 [16]       llama.cpp greedy continuation

Run with the reference venv: ``~/.cache/odmoe/refvenv/bin/python scripts/make_gguf_deepseek_fixture.py``.
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
SRC = mf.FIXTURES / "deepseek_v3"
OUT = mg.OUT / "deepseek_v3-bf16.gguf"
SUMMARY = mg.OUT / "deepseek_v3-bf16.json"
TOL_HF = 1e-4  # llama.cpp (f32 weights, f32 KV cache) vs transformers


def patched_checkpoint() -> Path:
    d = mg.WORK / "deepseek_v3-gguf-src"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(SRC, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["scoring_func"] = "sigmoid"
    cfg["topk_method"] = "noaux_tc"
    rope = cfg["rope_parameters"]
    rope["mscale"] = rope["mscale_all_dim"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d


def check_bf16(hf_dir: Path):
    from safetensors.torch import load_file

    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if t.dtype != torch.bfloat16:
            raise SystemExit(f"{name} is {t.dtype}; a BF16 GGUF would change the model")


def hf_goldens(hf_dir: Path, ids):
    import transformers

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return mf.goldens_for(model, "deepseek_v3", ids)


def main():
    from safetensors.torch import load_file, save_file

    mg.check_versions()
    hf_dir = patched_checkpoint()
    check_bf16(hf_dir)
    original = load_file(str(SRC / "golden.safetensors"))
    ids = original["input_ids"]
    f32 = mg.WORK / "deepseek_v3-f32.gguf"
    mg.convert(hf_dir, f32, "odmoe-deepseek_v3-tiny", "f32")
    mg.check_f32(f32)
    mg.convert(hf_dir, OUT, "odmoe-deepseek_v3-tiny", "bf16")
    os.chmod(OUT, 0o644)
    hf = hf_goldens(hf_dir, ids)
    lg, greedy, margin = mg.llama_goldens(f32, ids)
    lg_bf16, greedy_bf16, _ = mg.llama_goldens(OUT, ids)
    golden = mg.golden_path(OUT)
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
        "source": "tests/fixtures/deepseek_v3 (scoring_func sigmoid, topk_method noaux_tc, mscale 0.8)",
        "bytes": OUT.stat().st_size,
        "golden_bytes": golden.stat().st_size,
        "sha256": mg.hashlib.sha256(OUT.read_bytes()).hexdigest(),
        "llama_f32_vs_hf_logits": mg.maxdiff(lg, hf["logits"]),
        "llama_bf16_vs_hf_logits": mg.maxdiff(lg_bf16, hf["logits"]),
        "llama_greedy_equals_hf": bool(torch.equal(greedy, hf["greedy_tokens"])),
        "llama_bf16_greedy_equals_hf": bool(torch.equal(greedy_bf16, hf["greedy_tokens"])),
        "llama_min_greedy_margin": round(margin, 6),
        "hf_min_greedy_margin": round(float(hf["greedy_margin"]), 6),
        "hf_vs_checkpoint_golden_logits (mscale 0.8 vs 1.0)": mg.maxdiff(hf["logits"], original["logits"]),
    }
    SUMMARY.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps(record, indent=2))
    if record["llama_f32_vs_hf_logits"] > TOL_HF:
        raise SystemExit(f"llama.cpp and transformers differ by {record['llama_f32_vs_hf_logits']}")
    if not record["llama_greedy_equals_hf"]:
        raise SystemExit("llama.cpp's greedy tokens differ from transformers'")
    if mg.dir_bytes() > mg.BUDGET:
        raise SystemExit(f"tests/fixtures/gguf is {mg.dir_bytes()} bytes, over {mg.BUDGET}")


if __name__ == "__main__":
    main()
