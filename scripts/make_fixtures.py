#!/usr/bin/env python3
"""Build the tiny Mixture-of-Experts reference checkpoints and their golden outputs.

For each architecture (Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V3, Kimi-K2 as a DeepSeek-V3
with Kimi's routing and YaRN values, GLM-4.5 and gpt-oss) this script creates a small, randomly initialised Hugging
Face checkpoint in ``tests/fixtures/<name>/`` together with ``golden.safetensors``, the outputs
of the Hugging Face transformers reference implementation that the Rust engine is tested
against:

    tests/fixtures/<name>/
        config.json                      model config (qwen3_moe, kimi_k2, glm4_moe: rewritten in
                                         hub spelling, rope_theta + rope_scaling, GLM's
                                         partial_rotary_factor at the top level)
        generation_config.json           eos_token_id = id of <|im_end|>
        model.safetensors                bf16 weights; mixtral is sharded instead:
                                         model-0000i-of-00003.safetensors + model.safetensors.index.json
        tokenizer.json                   shared byte-level BPE tokenizer (512 tokens)
        tokenizer_config.json            ChatML chat template, eos <|im_end|>, no bos
        golden.safetensors               reference tensors, see below
    tests/fixtures/fixtures.json         summary: seeds, sizes, margins, file sizes

Golden tensors (float32 unless noted), T = 12 prompt tokens, L layers, H hidden, V vocab:

    input_ids        I64 [T]        prompt drawn from the non-special vocabulary
    logits           F32 [T, V]     one causal forward pass over input_ids, positions 0..T-1
    hidden_states    F32 [L+1,T,H]  entry l < L: hidden state entering decoder layer l
                                    (entry 0 = token embeddings); entry L: output of the
                                    last decoder layer, before the final norm
    routing_ids      I64 [L, T, k]  experts chosen per layer/position, in torch.topk order
                                    (descending routing probability; DeepSeek and GLM:
                                    descending weight); -1 for the dense layers of DeepSeek
                                    and GLM models
    routing_weights  F32 [L, T, k]  the weights the model applies to those experts:
                                    softmax over all experts, top-k, renormalised to sum 1
                                    only for qwen3_moe (norm_topk_prob), mixtral and gpt_oss
                                    (its router softmaxes the top-k logits, plus a bias);
                                    DeepSeek: sigmoid scores of the experts chosen by
                                    score + e_score_correction_bias inside the best groups,
                                    renormalised, times routed_scaling_factor; 0 for dense
                                    layers
    greedy_tokens    I64 [16]       16 greedy tokens after input_ids (KV cache, no eos stop)
    prompt_ids       I64 [n]        tokenizer encoding of "The quick brown fox", no specials
    chat_ids         I64 [m]        tokenizer encoding of the chat template rendered for
                                    CHAT_MESSAGES with add_generation_prompt=True

Weights are drawn with numpy (PCG64) from a per-fixture seed, rounded to bfloat16 (that is
what is saved) and every golden is computed in float32 from the rounded weights, with eager
attention. Seeds are tried in order until the fixture is numerically safe: every routing
decision on the prompt has a gap >= 2e-3 between the k-th and (k+1)-th expert probability
(DeepSeek: between biased scores inside the kept groups, and between the last kept and the
first dropped group), and every greedy step has a top-1 vs top-2 logit margin >= 1e-2 (checked
by full recompute); the greedy continuation must also not contain the eos token <|im_end|>.
For DeepSeek fixtures the seed must also make the correction bias (and, with several groups,
the group limit) change at least one routing decision on the prompt, so that an engine ignoring
either fails.

Run by hand with the reference venv (see scripts/setup-reference-venv.sh):

    ~/.cache/odmoe/refvenv/bin/python scripts/make_fixtures.py            # build + verify
    ~/.cache/odmoe/refvenv/bin/python scripts/make_fixtures.py --verify   # verify only

Verification reloads every saved checkpoint with from_pretrained (float32) in a fresh
process and checks that it reproduces the goldens. Output is deterministic for a given
torch/transformers/tokenizers version.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

VOCAB = 512
T_PROMPT = 12
N_GREEDY = 16
MIN_ROUTING_GAP = 2e-3
MIN_GREEDY_MARGIN = 1e-2
MAX_SEEDS = 2000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT_TEXT = "The quick brown fox"
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "The quick brown fox"},
    {"role": "assistant", "content": "jumps over the lazy dog."},
    {"role": "user", "content": "Why?"},
]

# ChatML as used by Qwen2.5: every message is <|im_start|>{role}\n{content}<|im_end|>\n,
# and add_generation_prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Training text for the tokenizer (plain English, embedded so the result does not depend on
# the Python version).
CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts is a neural network in which
a small router chooses, for every token, a few of many feed-forward blocks called experts. Only
the chosen experts are evaluated, so the model can hold many more parameters than it reads for
any single token. The router is a linear layer followed by a softmax; the experts with the
highest probability are selected, and their outputs are added together, each scaled by its
routing weight.

When a model does not fit in memory, its experts can be kept on disk and loaded on demand.
The engine then has to decide which experts to keep in memory, which to read ahead of time,
and which to drop. A good cache keeps the experts that are used most often and reads the
others with large sequential requests, because a disk is much faster when it is asked for
long runs of bytes than for many small pieces scattered across the file.

The weather was cold and clear in the morning. She walked down to the harbour, where the
fishing boats were coming back with their nets, and bought bread and cheese from a small shop
near the water. In the afternoon the wind turned and the sky filled with grey clouds. By the
evening it was raining, and the streets were empty except for a dog that followed her home.

Python is a programming language that lets you work quickly and integrate systems more
effectively. Its standard library contains modules for reading and writing files, for
working with text and numbers, for talking to other programs over the network, and for
testing your own code. A function is defined with the keyword def, a class with the keyword
class, and a block of code is grouped by its indentation rather than by braces.

Numbers can be stored in many formats. A thirty-two bit float has a sign, eight bits of
exponent and twenty-three bits of fraction; the bfloat16 format keeps the same exponent but
only seven bits of fraction, so it covers the same range with less precision. Quantized
formats go further and store blocks of weights as small integers with a shared scale.

Once upon a time there was a king who had three daughters. The youngest was the most
beautiful, and the sun itself, which has seen so many things, was astonished whenever it
shone upon her face. Near the castle lay a great dark forest, and in the forest, under an old
lime tree, there was a well. When the day was very warm, the princess went out into the
forest and sat down by the side of the cool well.

How many tokens per second can a small computer generate? It depends on how many bytes must
be read for every token, on how fast the memory and the disk are, and on how much of the work
can be done while waiting for the next read. Measure first, then decide what to change.
"""

# Per-fixture build description. `config` is passed to the transformers config class.
SPECS = {
    "qwen2_moe": dict(
        config_class="Qwen2MoeConfig",
        model_class="Qwen2MoeForCausalLM",
        config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            qkv_bias=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
        top_k=2,
        shard_size=None,
        hub_spelling=False,
    ),
    "qwen3_moe": dict(
        config_class="Qwen3MoeConfig",
        model_class="Qwen3MoeForCausalLM",
        config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
        top_k=3,
        shard_size=None,
        hub_spelling=True,
    ),
    "mixtral": dict(
        config_class="MixtralConfig",
        model_class="MixtralForCausalLM",
        config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
            sliding_window=None,
            max_position_embeddings=4096,
        ),
        top_k=2,
        shard_size="150KB",
        hub_spelling=False,
    ),
    # DeepSeek-V3 in small: MLA with a query bottleneck, four groups of two experts of which two
    # are kept, YaRN with mscale != mscale_all_dim (so both the cos/sin scale and the softmax
    # scale differ from 1), one dense layer first.
    "deepseek_v3": dict(
        config_class="DeepseekV3Config",
        model_class="DeepseekV3ForCausalLM",
        config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=16,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
            max_position_embeddings=16384,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            num_mtp_layers=0,
        ),
        top_k=3,
        shard_size=None,
        hub_spelling=False,
    ),
    # Kimi-K2's values on the DeepSeek-V3 architecture (transformers has no kimi_k2 model type):
    # one group, top-8 of 16 experts, routed_scaling_factor 2.827, rope_theta 50000, YaRN factor
    # 32 with beta_fast = beta_slow = 1 and mscale = mscale_all_dim = 1, one dense layer first.
    "kimi_k2": dict(
        config_class="DeepseekV3Config",
        model_class="DeepseekV3ForCausalLM",
        config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=16,
            n_routed_experts=16,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            routed_scaling_factor=2.827,
            rope_interleave=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 50000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 1.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            num_mtp_layers=0,
        ),
        top_k=8,
        shard_size=None,
        hub_spelling=True,
    ),
    # GLM-4.5 in small: grouped-query attention with biases, QK-norm (GLM-4.5's 355B model has
    # it, Air does not) and rotary on half of each head (partial_rotary_factor 0.5); DeepSeek-V3's
    # sigmoid routing with the correction bias in one group, as every GLM-4.5 config has it; a
    # shared expert; one dense layer first.
    "glm4_moe": dict(
        config_class="Glm4MoeConfig",
        model_class="Glm4MoeForCausalLM",
        config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=True,
            use_qk_norm=True,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            num_nextn_predict_layers=0,
        ),
        top_k=3,
        shard_size=None,
        hub_spelling=True,
    ),
    # gpt-oss in small: attention with biases (the output's too) and a learned sink per head,
    # layers alternating between a sliding window of 4 (shorter than the 12-token prompt) and
    # full attention, YaRN as gpt-oss configures it; a router with a bias whose top-k logits are
    # softmaxed; experts with biases and the clamped SwiGLU, their weights drawn large enough
    # (expert_std) that the clamps at +-7 cut real values.
    "gpt_oss": dict(
        config_class="GptOssConfig",
        model_class="GptOssForCausalLM",
        config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        top_k=2,
        shard_size=None,
        hub_spelling=False,
        expert_std=0.9,
    ),
}

# Initialisation scales (std of a normal distribution).
EMBED_STD = 0.25  # embeddings and lm_head: logits std ~ 8 * 0.25 = 2
LINEAR_STD = 0.15  # attention and expert projections (fan-in 32..128)
BIAS_STD = 0.1
ROUTER_STD = 0.25  # router logits std ~ 2: mixed weights, safe top-k gaps
NORM_STD = 0.1  # RMSNorm weights 1 + 0.1 * N(0, 1)
CORRECTION_BIAS_STD = 0.15  # DeepSeek's e_score_correction_bias, against sigmoid scores in (0, 1)


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return tok, ids


def tokenizer_config(special_ids):
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(special_ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


# ----------------------------------------------------------------------------- models


def make_config(name, special_ids):
    import transformers

    spec = SPECS[name]
    cfg = getattr(transformers, spec["config_class"])(
        **spec["config"],
        bos_token_id=None,
        eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=None,
    )
    cfg._attn_implementation = "eager"
    return cfg


def is_router(module):
    # Qwen and Mixtral spell it TopKRouter, DeepSeek-V3 TopkRouter.
    return type(module).__name__.endswith(("TopKRouter", "TopkRouter"))


def is_deepseek(name):
    """DeepSeek-V3's routing: DeepSeek-V3 itself and GLM-4.5."""
    return SPECS[name]["model_class"] in ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM")


def init_weights(model, seed, expert_std=LINEAR_STD):
    """Deterministic init from numpy PCG64: scaled so that norms and routing matter."""
    rng = np.random.default_rng(seed)
    routers = {id(m.weight) for m in model.modules() if is_router(m)}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            shape = tuple(p.shape)
            z = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
            if pname.endswith("norm.weight"):
                val = 1.0 + NORM_STD * z
            elif id(p) in routers:
                val = ROUTER_STD * z
            elif "embed_tokens" in pname or "lm_head" in pname:
                val = EMBED_STD * z
            elif pname.endswith(".bias"):
                val = BIAS_STD * z
            elif ".mlp.experts." in pname and not pname.endswith("_bias"):
                val = expert_std * z
            else:
                val = LINEAR_STD * z
            p.copy_(val)
        # DeepSeek's routing bias is a buffer, drawn after every parameter (the other fixtures
        # have none, so their weights are unchanged).
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                z = torch.from_numpy(rng.standard_normal(tuple(b.shape), dtype=np.float32))
                b.copy_(CORRECTION_BIAS_STD * z)


def build_model(name, seed, special_ids):
    """Random model for `seed` with bf16-rounded weights. Returns (bf16 model to save,
    f32 model holding exactly the same values)."""
    import transformers

    spec = SPECS[name]
    cfg = make_config(name, special_ids)
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model_class"])(cfg)
    init_weights(model, seed, spec.get("expert_std", LINEAR_STD))
    # Round the parameters to bf16 but keep the model in f32: casting the whole module to
    # bf16 and back would also round non-persistent buffers such as the rotary inv_freq,
    # which a checkpoint loaded in f32 recomputes exactly.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # saved as bf16 like the weights
                b.copy_(b.to(torch.bfloat16).float())
    f32 = model.eval()
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    return bf16, f32


def prompt_ids(seed, special_ids):
    rng = np.random.default_rng([seed, 1])
    allowed = np.array(sorted(set(range(VOCAB)) - set(special_ids.values())), dtype=np.int64)
    return torch.from_numpy(rng.choice(allowed, size=T_PROMPT, replace=True))


# ----------------------------------------------------------------------------- goldens


def decoder_layers(model):
    return model.model.layers


def routers(model):
    return [m for m in model.modules() if is_router(m)]


def layer_router(layer):
    """The router of a decoder layer, or None for a dense layer (DeepSeek's first ones)."""
    return next((m for m in layer.modules() if is_router(m)), None)


def deepseek_routing(r, x, top_k):
    """Independent recomputation of DeepSeek-V3 routing for router `r` on inputs `x` [T, H].

    Returns ids and weights ordered by descending weight, the smallest decision margin (k-th vs
    (k+1)-th biased score inside the kept groups, and last kept vs first dropped group), and
    how many positions would choose other experts without the bias or without the group limit.
    """
    scores = torch.sigmoid(x.float() @ r.weight.float().t())
    t, e = scores.shape
    g, size = r.num_group, e // r.num_group

    def choose(choice, limit_groups):
        group_scores = choice.view(t, g, size).topk(2, dim=-1).values.sum(-1)
        ranked = group_scores.sort(dim=-1, descending=True, stable=True)
        masked = choice
        if limit_groups:
            keep = torch.zeros(t, g, dtype=torch.bool)
            keep.scatter_(1, ranked.indices[:, : r.topk_group], True)
            masked = choice.masked_fill(~keep.repeat_interleave(size, dim=1), float("-inf"))
        return masked, ranked.values, masked.topk(top_k, dim=-1).indices

    choice = scores + r.e_score_correction_bias.float()
    masked, group_values, idx = choose(choice, True)
    w = scores.gather(1, idx)
    if r.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * r.routed_scaling_factor
    order = w.argsort(dim=-1, descending=True, stable=True)
    idx, w = idx.gather(1, order), w.gather(1, order)

    ranked = masked.sort(dim=-1, descending=True).values
    margin = (ranked[:, top_k - 1] - ranked[:, top_k]).min().item() if top_k < e else float("inf")
    if r.topk_group < g:
        margin = min(margin, (group_values[:, r.topk_group - 1] - group_values[:, r.topk_group]).min().item())

    def changed(other):
        return sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(idx, other))

    bias_changes = changed(choose(scores, True)[2])
    group_changes = changed(choose(choice, False)[2])
    return idx, w, margin, bias_changes, group_changes


@torch.no_grad()
def forward_capture(model, ids, top_k, norm_topk):
    """One forward pass; returns logits, hidden states and routing, plus routing margins."""
    layers = decoder_layers(model)
    rs = [layer_router(layer) for layer in layers]
    assert sum(r is not None for r in rs) == len(routers(model))
    entering = [None] * len(layers)
    last_out = [None]
    routed = [None] * len(rs)
    hooks = []

    def pre_hook(i):
        def f(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            entering[i] = h.detach().clone()

        return f

    def post_hook(mod, args, kwargs, out):
        o = out[0] if isinstance(out, (tuple, list)) else out
        last_out[0] = o.detach().clone()

    def router_hook(i):
        def f(mod, args, out):
            x = args[0]
            routed[i] = (x.detach().clone(), [o.detach().clone() for o in out])

        return f

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
    hooks.append(layers[-1].register_forward_hook(post_hook, with_kwargs=True))
    for i, r in enumerate(rs):
        if r is not None:
            hooks.append(r.register_forward_hook(router_hook(i)))
    try:
        out = model(input_ids=ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    logits = out.logits[0].float()
    hidden = torch.stack([e[0] for e in entering] + [last_out[0][0]]).float()

    r_ids, r_w, margins = [], [], []
    bias_changes = group_changes = 0
    for i, r in enumerate(rs):
        if r is None:  # a dense layer routes nothing
            r_ids.append(torch.full((ids.shape[0], top_k), -1, dtype=torch.int64))
            r_w.append(torch.zeros(ids.shape[0], top_k))
            continue
        x, (m_logits, m_scores, m_idx) = routed[i]
        x = x.reshape(-1, x.shape[-1])
        if hasattr(r, "e_score_correction_bias"):
            d_idx, d_w, margin, bias_c, group_c = deepseek_routing(r, x, top_k)
            # The model lists its choice unsorted: compare in weight order.
            order = m_scores.float().argsort(dim=-1, descending=True, stable=True)
            assert torch.equal(m_idx.gather(1, order), d_idx), f"router {i}: expert choice differs"
            assert torch.allclose(m_scores.float().gather(1, order), d_w, atol=1e-6, rtol=0), f"router {i}: weights differ"
            margins.append(margin)
            bias_changes += bias_c
            group_changes += group_c
            r_ids.append(d_idx.to(torch.int64))
            r_w.append(m_scores.float().gather(1, order))
            continue
        # Independent recomputation of the routing decision.
        lg = x.float() @ r.weight.float().t()
        if getattr(r, "bias", None) is not None:  # gpt-oss's router has one
            lg = lg + r.bias.float()
        probs = torch.softmax(lg, dim=-1)
        top_v, top_i = torch.topk(probs, top_k, dim=-1)
        if norm_topk:
            top_v = top_v / top_v.sum(-1, keepdim=True)
        assert torch.equal(top_i, m_idx), f"router {i}: expert choice differs from the model's"
        assert torch.allclose(top_v, m_scores.float(), atol=1e-6, rtol=0), f"router {i}: weights differ"
        assert torch.allclose(lg, m_logits.float(), atol=1e-5, rtol=0), f"router {i}: logits differ"
        sorted_p = torch.sort(probs, dim=-1, descending=True).values
        margins.append((sorted_p[:, top_k - 1] - sorted_p[:, top_k]).min().item())
        r_ids.append(m_idx.to(torch.int64))
        r_w.append(m_scores.float())

    # The embedding entry must be the raw token embedding.
    emb = model.model.embed_tokens(ids[None])[0].float()
    assert torch.equal(hidden[0], emb)
    # The last entry must be what the final norm turns into the pre-head state.
    normed = model.model.norm(hidden[-1][None].to(model.dtype))[0]
    assert torch.allclose(model.lm_head(normed).float(), logits, atol=1e-5, rtol=0)

    return dict(
        logits=logits.contiguous(),
        hidden_states=hidden.contiguous(),
        routing_ids=torch.stack(r_ids).contiguous(),
        routing_weights=torch.stack(r_w).contiguous(),
        routing_margin=min(margins),
        bias_changes=bias_changes,
        group_changes=group_changes,
    )


@torch.no_grad()
def greedy(model, ids):
    """Greedy continuation with the KV cache, checked step by step by full recompute."""
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=N_GREEDY,
        min_new_tokens=N_GREEDY,
        eos_token_id=None,  # no stopping and no eos suppression: plain argmax
        pad_token_id=0,
        use_cache=True,
    )
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), generation_config=gc)
    new = out[0, ids.shape[0] :].to(torch.int64)
    assert new.shape[0] == N_GREEDY, new.shape
    margins = []
    seq = ids
    for step in range(N_GREEDY):
        lg = model(input_ids=seq[None], use_cache=False).logits[0, -1].float()
        top2 = torch.topk(lg, 2)
        margins.append((top2.values[0] - top2.values[1]).item())
        if top2.indices[0].item() != new[step].item():
            return new, -1.0  # KV-cache path disagrees with full recompute
        seq = torch.cat([seq, new[step : step + 1]])
    return new, min(margins)


def goldens_for(model, name, ids):
    spec = SPECS[name]
    norm_topk = getattr(model.config, "norm_topk_prob", True)  # mixtral always renormalises
    g = forward_capture(model, ids, spec["top_k"], norm_topk)
    g["greedy_tokens"], g["greedy_margin"] = greedy(model, ids)
    g["input_ids"] = ids.clone()
    return g


def search_seed(name, special_ids, start=0):
    for seed in range(start, start + MAX_SEEDS):
        _, f32 = build_model(name, seed, special_ids)
        ids = prompt_ids(seed, special_ids)
        norm_topk = getattr(f32.config, "norm_topk_prob", True)
        g = forward_capture(f32, ids, SPECS[name]["top_k"], norm_topk)
        if g["routing_margin"] < MIN_ROUTING_GAP:
            continue
        if is_deepseek(name):
            # The bias and the group limit must each decide something, or a test could not
            # tell an engine that ignores them.
            if g["bias_changes"] == 0:
                continue
            if f32.config.n_group > 1 and g["group_changes"] == 0:
                continue
        new, gm = greedy(f32, ids)
        if gm < MIN_GREEDY_MARGIN:
            continue
        if special_ids["<|im_end|>"] in new.tolist():
            continue  # keep eos out of the continuation so tests may leave eos stopping on
        return seed
    raise SystemExit(f"{name}: no safe seed in [{start}, {start + MAX_SEEDS})")


# ----------------------------------------------------------------------------- writing


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def rewrite_hub_spelling(cfg_path):
    """transformers 5 writes rope_parameters / num_local_experts; hub checkpoints say
    rope_theta (+ rope_scaling, with "type" for scaled RoPE) / num_experts."""
    cfg = json.loads(Path(cfg_path).read_text())
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    kind = rp.pop("rope_type", "default")
    if "partial_rotary_factor" in rp:  # GLM-4.5 writes it beside rope_theta
        cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    write_json(cfg_path, cfg)


def text_goldens(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    p = tok.encode(PROMPT_TEXT, add_special_tokens=False)
    chat = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    c = tok.encode(chat, add_special_tokens=False)
    return tok, torch.tensor(p, dtype=torch.int64), chat, torch.tensor(c, dtype=torch.int64)


def build(names):
    import transformers
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    tok, special_ids = build_tokenizer()
    tok_twice, _ = build_tokenizer()
    assert tok.to_str() == tok_twice.to_str(), "tokenizer training is not deterministic"
    summary_path = FIXTURES / "fixtures.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["fixtures"] = {k: v for k, v in summary.get("fixtures", {}).items() if k in SPECS}

    for name in names:
        spec = SPECS[name]
        out_dir = FIXTURES / name
        seed = search_seed(name, special_ids)
        print(f"[{name}] seed {seed}", flush=True)
        model, f32 = build_model(name, seed, special_ids)
        ids = prompt_ids(seed, special_ids)
        g_mem = goldens_for(f32, name, ids)

        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        kw = {"max_shard_size": spec["shard_size"]} if spec["shard_size"] else {}
        model.save_pretrained(out_dir, **kw)
        write_json(
            out_dir / "generation_config.json",
            {
                "bos_token_id": None,
                "eos_token_id": special_ids["<|im_end|>"],
                "pad_token_id": special_ids["<|endoftext|>"],
                "transformers_version": transformers.__version__,
            },
        )
        tok.save(str(out_dir / "tokenizer.json"))
        write_json(out_dir / "tokenizer_config.json", tokenizer_config(special_ids))

        # Goldens from the checkpoint as written (float32 from the bf16 file).
        cls = getattr(transformers, spec["model_class"])
        loaded = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
        g = goldens_for(loaded, name, ids)
        for key in ("logits", "hidden_states", "routing_ids", "routing_weights", "greedy_tokens"):
            assert torch.equal(g[key], g_mem[key]), f"{name}: {key} differs after save/load"

        if spec["hub_spelling"]:
            rewrite_hub_spelling(out_dir / "config.json")
            again = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
            g2 = forward_capture(again, ids, spec["top_k"], again.config.norm_topk_prob)
            assert torch.equal(g2["logits"], g["logits"]), f"{name}: rewritten config changes logits"

        _, p_ids, chat_text, c_ids = text_goldens(out_dir)
        assert p_ids.tolist() == tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
        tensors = {
            "input_ids": g["input_ids"],
            "logits": g["logits"],
            "hidden_states": g["hidden_states"],
            "routing_ids": g["routing_ids"],
            "routing_weights": g["routing_weights"],
            "greedy_tokens": g["greedy_tokens"],
            "prompt_ids": p_ids,
            "chat_ids": c_ids,
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "golden.safetensors"), metadata={"format": "pt"})

        cfg = loaded.config
        files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
        summary["fixtures"][name] = {
            "architecture": spec["model_class"],
            "model_type": cfg.model_type,
            "seed": seed,
            "sizes": {
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                "num_experts": spec["config"].get(
                    "num_experts", spec["config"].get("num_local_experts", spec["config"].get("n_routed_experts"))
                ),
                "num_experts_per_tok": spec["top_k"],
                "expert_intermediate_size": spec["config"].get("moe_intermediate_size", spec["config"].get("intermediate_size")),
                "shared_expert_intermediate_size": spec["config"].get("shared_expert_intermediate_size"),
                "prompt_tokens": T_PROMPT,
                "greedy_tokens": N_GREEDY,
            },
            "min_routing_margin": round(g["routing_margin"], 6),
            "min_greedy_margin": round(g["greedy_margin"], 6),
            "logits_std": round(g["logits"].std().item(), 4),
            "files": files,
        }
        summary["tokenizer"] = {
            "vocab_size": VOCAB,
            "special_tokens": special_ids,
            "prompt_text": PROMPT_TEXT,
            "chat_messages": CHAT_MESSAGES,
            "chat_text": chat_text,
        }
        summary["versions"] = {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "tokenizers": __import__("tokenizers").__version__,
        }
        summary["thresholds"] = {"min_routing_gap": MIN_ROUTING_GAP, "min_greedy_margin": MIN_GREEDY_MARGIN}
        write_json(summary_path, summary)
        print(f"[{name}] written to {out_dir.relative_to(ROOT)}", flush=True)


# ----------------------------------------------------------------------------- verify


def verify(names):
    """Fresh-process check: reload each fixture with from_pretrained and compare."""
    import transformers
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    summary = json.loads((FIXTURES / "fixtures.json").read_text())
    ok = True
    for name in names:
        spec = SPECS[name]
        d = FIXTURES / name
        gold = load_file(str(d / "golden.safetensors"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        assert type(model).__name__ == spec["model_class"], type(model).__name__
        norm_topk = getattr(model.config, "norm_topk_prob", True)
        g = goldens_for(model, name, gold["input_ids"])
        diffs = {
            k: (g[k].float() - gold[k].float()).abs().max().item()
            for k in ("logits", "hidden_states", "routing_weights")
        }
        same_ids = torch.equal(g["routing_ids"], gold["routing_ids"])
        same_greedy = torch.equal(g["greedy_tokens"], gold["greedy_tokens"])
        try:
            sdpa = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype=torch.float32, attn_implementation="sdpa"
            ).eval()
        except ValueError:  # gpt-oss has only eager attention (its sinks)
            sdpa = None
        sdpa_diff = float("nan")
        if sdpa is not None:
            with torch.no_grad():
                sdpa_diff = (sdpa(input_ids=gold["input_ids"][None]).logits[0] - gold["logits"]).abs().max().item()
        tok, p_ids, _, c_ids = text_goldens(d)
        text_ok = torch.equal(p_ids, gold["prompt_ids"]) and torch.equal(c_ids, gold["chat_ids"])
        good = (
            diffs["logits"] <= 1e-6
            and diffs["hidden_states"] <= 1e-6
            and diffs["routing_weights"] <= 1e-6
            and same_ids
            and same_greedy
            and text_ok
            and tok.eos_token == "<|im_end|>"
            and tok.bos_token is None
        )
        ok &= good
        info = summary["fixtures"][name]
        print(f"== {name} ({spec['model_class']}, seed {info['seed']}): {'OK' if good else 'FAILED'}")
        print(
            f"   max |diff| logits {diffs['logits']:.2e}, hidden {diffs['hidden_states']:.2e}, "
            f"routing weights {diffs['routing_weights']:.2e}; routing ids equal {same_ids}, "
            f"greedy equal {same_greedy}, text ids equal {text_ok}; sdpa logits diff {sdpa_diff:.2e}"
        )
        print(
            f"   min routing margin {g['routing_margin']:.4g}, min greedy margin {g['greedy_margin']:.4g}, "
            f"logits std {g['logits'].std().item():.3f}, norm_topk {bool(norm_topk)}"
        )
        for fname in sorted(os.listdir(d)):
            print(f"   {os.path.getsize(d / fname):>9}  {fname}")
    # tests/fixtures/gguf has its own budget (make_gguf_fixtures.py).
    total = sum(
        p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file() and p.relative_to(FIXTURES).parts[0] != "gguf"
    )
    print(f"total tests/fixtures (without gguf/): {total} bytes ({total / 1e6:.2f} MB)")
    if total > 8_000_000:
        print("tests/fixtures (without gguf/) exceeds 8 MB")
        ok = False
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=list(SPECS), help="fixtures to build (default: all)")
    ap.add_argument("--verify", action="store_true", help="only verify existing fixtures")
    args = ap.parse_args()
    for n in args.names:
        if n not in SPECS:
            raise SystemExit(f"unknown fixture {n}; known: {', '.join(SPECS)}")
    if args.verify:
        sys.exit(0 if verify(args.names) else 1)
    build(args.names)
    # Verify in a fresh interpreter so nothing cached in this process can hide a problem.
    rc = subprocess.call([sys.executable, __file__, "--verify", *args.names])
    sys.exit(rc)


if __name__ == "__main__":
    main()
