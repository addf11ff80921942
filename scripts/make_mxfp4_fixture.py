#!/usr/bin/env python3
"""Build tests/fixtures/gpt_oss_mxfp4: the tiny gpt-oss checkpoint with its experts in MXFP4, as
OpenAI's released checkpoints keep them, and its goldens from transformers.

The BF16 fixture (tests/fixtures/gpt_oss, built by make_fixtures.py) gives every weight. Each
layer's fused experts are quantized to MXFP4 as ggml's reference quantizer does it (per 32 values
along the input: the exponent from the largest magnitude, each value its nearest e2m1 code, the
first on ties) and stored as transformers reads them:

    model.layers.L.mlp.experts.gate_up_proj_blocks  U8 [experts, 2 * width, hidden / 32, 16]
    model.layers.L.mlp.experts.gate_up_proj_scales  U8 [experts, 2 * width, hidden / 32]
    model.layers.L.mlp.experts.down_proj_blocks     U8 [experts, hidden, width / 32, 16]
    model.layers.L.mlp.experts.down_proj_scales     U8 [experts, hidden, width / 32]

a row per output (gate_up's rows interleave gate and up, as its columns do in BF16), byte j of a
block holding value 2j in its low nibble and 2j + 1 in its high one, and the value
e2m1[code] * 2^(scale - 127). The config names quant_method "mxfp4". Goldens are computed by
transformers in float32 from the checkpoint as written, dequantized on load
(Mxfp4Config(dequantize=True)): the same tensors and checks as make_fixtures.py's.

    ~/.cache/odmoe/refvenv/bin/python scripts/make_mxfp4_fixture.py
"""

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as fx  # noqa: E402

SOURCE = fx.FIXTURES / "gpt_oss"
OUT = fx.FIXTURES / "gpt_oss_mxfp4"
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize(w):
    """Rows `w` [..., cols] (cols a multiple of 32) as MXFP4: blocks [..., cols / 32, 16] and
    scales [..., cols / 32], both uint8."""
    *prefix, cols = w.shape
    blocks = w.float().reshape(*prefix, cols // 32, 32)
    largest = blocks.abs().amax(-1)
    exponent = torch.where(
        largest > 0, torch.floor(torch.log2(largest.clamp_min(1e-38))) - 2 + 127, torch.zeros_like(largest)
    ).clamp(0, 255)
    scaled = blocks / torch.pow(2.0, exponent - 127).unsqueeze(-1)
    # The nearest magnitude, the first on ties (argmin takes the first minimum).
    magnitude = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)
    codes = torch.where((scaled < 0) & (magnitude > 0), magnitude + 8, magnitude).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), exponent.to(torch.uint8).contiguous()


def main():
    import transformers
    from safetensors.torch import load_file, save_file

    weights = load_file(str(SOURCE / "model.safetensors"))
    out = {}
    for name, tensor in weights.items():
        fused = name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj")
        if not fused:
            out[name] = tensor
            continue
        # [experts, in, out] -> a row per output.
        blocks, scales = quantize(tensor.transpose(1, 2))
        out[f"{name}_blocks"] = blocks
        out[f"{name}_scales"] = scales

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    save_file(out, str(OUT / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((SOURCE / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    fx.write_json(OUT / "config.json", config)
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SOURCE / extra, OUT / extra)

    torch.set_num_threads(1)
    model = transformers.GptOssForCausalLM.from_pretrained(
        OUT,
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True),
    ).eval()
    ids = load_file(str(SOURCE / "golden.safetensors"))["input_ids"]
    g = fx.goldens_for(model, "gpt_oss", ids)
    print(f"routing margin {g['routing_margin']:.4g}, greedy margin {g['greedy_margin']:.4g}")
    assert g["routing_margin"] >= fx.MIN_ROUTING_GAP, "a routing decision is too close to call"
    assert g["greedy_margin"] >= fx.MIN_GREEDY_MARGIN, "a greedy step is too close to call"
    keys = ("input_ids", "logits", "hidden_states", "routing_ids", "routing_weights", "greedy_tokens")
    save_file(
        {k: g[k].contiguous() for k in keys},
        str(OUT / "golden.safetensors"),
        metadata={"format": "pt"},
    )
    print(f"written to {OUT.relative_to(fx.ROOT)}")


if __name__ == "__main__":
    main()
