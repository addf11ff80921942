#!/usr/bin/env python3
"""Writes tests/fixtures/templates/refs.json: real chat templates rendered by transformers.

The templates of gpt-oss (Harmony) and GLM-4.6 ship in their checkpoints' chat_template.jinja,
not in any tokenizer package; llama.cpp tests with copies of them, which
scripts/fetch-llama-vocabs.sh extracts into `${ODMOE_LLAMA_VOCABS_DIR:-~/.cache/odmoe/llama-vocabs}/
templates/`. Each conversation is rendered with transformers' apply_chat_template (tools and the
generation prompt included) on the gpt-oss tokenizer (scripts/fetch-tokenizers.sh gptoss), whose
special tokens the gpt-oss template names; GLM's names none. The date the gpt-oss template prints
is the day of rendering: tests compare with it masked.

    ~/.cache/odmoe/refvenv/bin/python scripts/make_template_refs.py
"""

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import PreTrainedTokenizerFast  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "templates" / "refs.json"
CACHE = Path.home() / ".cache" / "odmoe"
TEMPLATES = Path(os.environ.get("ODMOE_LLAMA_VOCABS_DIR", CACHE / "llama-vocabs")) / "templates"
TOKENIZER = Path(os.environ.get("ODMOE_TOKENIZERS_DIR", CACHE / "tokenizers")) / "gptoss"

TEMPLATE_FILES = {"gpt-oss": "openai-gpt-oss-120b.jinja", "glm-4.6": "GLM-4.6.jinja"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
CONVERSATIONS = {
    "system_and_user": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        None,
    ),
    "tool_call_and_result": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny, 21 C"},
        ],
        TOOLS,
    ),
    "two_turns": (
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me more"},
        ],
        None,
    ),
}


def main():
    tok = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    out = {"templates": {}}
    for name, file in TEMPLATE_FILES.items():
        source = (TEMPLATES / file).read_text()
        renders = {}
        for conv, (messages, tools) in CONVERSATIONS.items():
            renders[conv] = {
                "messages": messages,
                "tools": tools,
                "rendered": tok.apply_chat_template(
                    messages, tools=tools, chat_template=source, tokenize=False, add_generation_prompt=True
                ),
            }
        out["templates"][name] = {
            "file": file,
            "sha256": hashlib.sha256(source.encode()).hexdigest(),
            "conversations": renders,
        }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
