#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer_refs.json: reference token ids and chat-template renderings.

Run by hand with the reference venv (scripts/setup-reference-venv.sh), after
scripts/fetch-tokenizers.sh has put the tokenizer files in the cache:

    ~/.cache/odmoe/refvenv/bin/python scripts/make_tokenizer_refs.py [--out PATH]

Ids come from the `tokenizers` library (`Tokenizer.from_file(tokenizer.json)`), which is what the Rust
`tokenizers` crate reproduces. Where transformers' own tokenizer class gives something else for the same
input, that is recorded beside it under "transformers". Chat renderings come from transformers'
`apply_chat_template(..., tokenize=False)`. The output is deterministic for given package versions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jinja2  # noqa: E402
import jinja2.meta  # noqa: E402
import jinja2.sandbox  # noqa: E402
import jinja2.nodes as jn  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
import transformers.utils.chat_template_utils as ctu  # noqa: E402
from tokenizers import AddedToken, Tokenizer  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO / "scripts" / "fetch-tokenizers.sh"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "tokenizer_refs.json"
TOKENIZERS_DIR = Path(os.environ.get("ODMOE_TOKENIZERS_DIR", Path.home() / ".cache" / "odmoe" / "tokenizers"))
NAMES = ["qwen3", "deepseek_v3", "llama3", "llama2"]
FILES = ["tokenizer.json", "tokenizer_config.json"]

# Templates that call strftime_now() get this instant instead of the wall clock.
PINNED_NOW = _dt.datetime(2024, 7, 26, 12, 0, 0)
DATE_STRING = PINNED_NOW.strftime("%d %b %Y")  # "26 Jul 2024", the format Llama 3.1+ templates use

# ---------------------------------------------------------------------------------------------------------------
# Inputs

COMMON_TEXTS: list[tuple[str, str]] = [
    ("empty", ""),
    ("ascii_prose", "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it? I'M SURE we'll see."),
    ("numbers", "Pi is 3.14159, e=2.71828; 1234567890 and 1,000,000 (1e-9) -42 +7 0x1F 2024-07-26 12:30:05 99.5%"),
    (
        "code_rust",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n"
        "    for (i, x) in v.iter().enumerate() {\n        println!(\"{i}: {x}\");\n    }\n}\n",
    ),
    (
        "code_python",
        "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n"
        "class A:\n\tdef f(self):\n\t\treturn {'k': [1, 2]}  # tab-indented\n",
    ),
    ("whitespace_runs", "a  b   c    d\t\te\n\n\nf \n  \n\t g   "),
    ("whitespace_only", "   \n\t  \r\n"),
    ("leading_trailing_space", " leading and trailing spaces  "),
    ("crlf", "line one\r\nline two\r\n\r\nend"),
    ("chinese", "我喜欢自然语言处理。今天天气很好！你好，世界"),
    ("japanese", "日本語のテキスト、カタカナとひらがな。東京は晴れです。"),
    ("korean_mixed_scripts", "한국어 문장입니다. русский текст, ελληνικά, हिन्दी"),
    ("emoji", "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 rainbow 🏳️‍🌈 flags 🇯🇵🇫🇷 heart ❤️ done"),
    ("accented_latin", "Café naïve façade São Paulo Ærøskøbing Straße «ça va?» déjà vu; decomposed: cafe\u0301"),
    ("arabic_hebrew", "مرحبا بالعالم ١٢٣ — שלום עולם"),
    (
        "long_word",
        "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft "
        "pneumonoultramicroscopicsilicovolcanoconiosis "
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ),
    ("chatml_special_text", "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"),
]

# Text containing each tokenizer's own special tokens (they must come out as single ids).
SPECIAL_TEXTS: dict[str, list[tuple[str, str]]] = {
    "qwen3": [("own_special_text", "<|endoftext|>a<|im_start|>system\nx<|im_end|><think>\n\n</think>\n\n")],
    "deepseek_v3": [("own_special_text", "<｜begin▁of▁sentence｜>sys<｜User｜>Hi<｜Assistant｜>Yo<｜end▁of▁sentence｜>")],
    "llama3": [
        (
            "own_special_text",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|end_of_text|>",
        )
    ],
    "llama2": [("own_special_text", "<s>[INST] Hi there [/INST] Hello</s><unk>")],
}

SYSTEM = "You are a helpful assistant."
CONVERSATIONS: list[tuple[str, list[dict]]] = [
    ("user", [{"role": "user", "content": "Hello! What is 2+2?"}]),
    (
        "system_user",
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Translate 'cat' into French."}],
    ),
    (
        "multi_turn",
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "  Und auf Deutsch? 🙂 Antworte kurz.\n"},
        ],
    ),
    (
        "ends_with_assistant",
        [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ],
    ),
    (
        "assistant_with_think",
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ),
]
# Rendered only by templates that read `tools`: exercises |tojson and the tool-call branches.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = (
    "tool_use",
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}
            ],
        },
        {"role": "tool", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
    ],
    [WEATHER_TOOL],
)
# Extra template variables tried for some tokenizers (only when the template reads them).
EXTRA_KWARGS: dict[str, list[dict]] = {"qwen3": [{"enable_thinking": False}]}


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256_str(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def read_pins() -> tuple[str, dict[str, str], dict[str, str]]:
    """Package version, name -> package, and "<name>/<file>" -> sha256, as pinned in fetch-tokenizers.sh."""
    src = FETCH_SCRIPT.read_text()
    version = re.search(r'^VERSION="([^"]+)"', src, re.M).group(1)
    packages = dict(re.findall(r'^\s*\[(\w+)\]="(@[^"]+)"', src, re.M))
    shas = dict(re.findall(r'^\s*\[(\w+/[\w.]+)\]="([0-9a-f]{64})"', src, re.M))
    return version, packages, shas


def pinned_strftime_now():
    """Make transformers' strftime_now() global return the pinned instant."""

    class PinnedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: D401
            return PINNED_NOW if tz is None else PINNED_NOW.replace(tzinfo=tz)

    ctu.datetime = PinnedDatetime
    ctu._compile_jinja_template.cache_clear()


def added_token_from_config(v):
    if isinstance(v, dict) and v.get("__type") == "AddedToken":
        return AddedToken(
            v["content"],
            single_word=v.get("single_word", False),
            lstrip=v.get("lstrip", False),
            rstrip=v.get("rstrip", False),
            normalized=v.get("normalized", True),
            special=v.get("special", True),
        )
    return v


def fast_from_config(directory: Path, cfg: dict) -> PreTrainedTokenizerFast:
    """PreTrainedTokenizerFast(tokenizer_file=..., **tokenizer_config), with the JSON-only fields made loadable."""
    kwargs = {}
    for k, v in cfg.items():
        if k in ("added_tokens_decoder", "tokenizer_class", "auto_map"):
            continue  # the added tokens are in tokenizer.json already
        kwargs[k] = added_token_from_config(v)
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **kwargs)


def select_template(cfg: dict) -> tuple[str | None, str | None]:
    """(template, note). A list of named templates resolves to the one named "default", as transformers does."""
    ct = cfg.get("chat_template")
    if ct is None:
        return None, "tokenizer_config.json has no chat_template"
    if isinstance(ct, list):
        named = {t["name"]: t["template"] for t in ct}
        if "default" not in named:
            raise SystemExit(f"template list without 'default': {sorted(named)}")
        return named["default"], f"chat_template is a list of named templates {sorted(named)}; using 'default'"
    return ct, None


def jinja_features(template: str) -> dict:
    """What a Jinja implementation must support to render this template, read from its syntax tree."""
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    ast = env.parse(template)
    filters = sorted({n.name for n in ast.find_all(jn.Filter)})
    tests = sorted({n.name for n in ast.find_all(jn.Test)})
    methods, functions, loop_attrs = set(), set(), set()
    for call in ast.find_all(jn.Call):
        if isinstance(call.node, jn.Getattr):
            methods.add(call.node.attr)
        elif isinstance(call.node, jn.Name):
            functions.add(call.node.name)
    for ga in ast.find_all(jn.Getattr):
        if isinstance(ga.node, jn.Name) and ga.node.name == "loop":
            loop_attrs.add(ga.attr)
    statements = set()
    for node_type, label in [
        (jn.For, "for"),
        (jn.If, "if"),
        (jn.Assign, "set"),
        (jn.AssignBlock, "set_block"),
        (jn.Macro, "macro"),
        (jn.CallBlock, "call_block"),
        (jn.FilterBlock, "filter_block"),
        (jn.With, "with"),
        (jn.Break, "break"),
        (jn.Continue, "continue"),
        (jn.Include, "include"),
        (jn.Import, "import"),
    ]:
        if any(True for _ in ast.find_all(node_type)):
            statements.add(label)
    if any(isinstance(a.target, jn.NSRef) for a in ast.find_all(jn.Assign)):
        statements.add("set_namespace_attr")
    expressions = set()
    for sl in ast.find_all(jn.Slice):
        expressions.add("slice_with_step" if sl.step is not None else "slice")
    for gi in ast.find_all(jn.Getitem):
        arg = gi.arg
        if isinstance(arg, jn.Const) and isinstance(arg.value, str):
            expressions.add("subscript_string_key")
        elif isinstance(arg, jn.Neg) or (isinstance(arg, jn.Const) and isinstance(arg.value, int) and arg.value < 0):
            expressions.add("subscript_negative_index")
        elif not isinstance(arg, jn.Slice):
            expressions.add("subscript_expression")
    for ga in ast.find_all(jn.Getattr):
        expressions.add("attribute_access")
    for cmp_ in ast.find_all(jn.Compare):
        for op in cmp_.ops:
            expressions.add({"in": "in", "notin": "not_in"}.get(op.op, "compare_" + op.op))
    for node_type, label in [
        (jn.Add, "plus"),
        (jn.Sub, "minus"),
        (jn.Concat, "tilde_concat"),
        (jn.CondExpr, "inline_if"),
        (jn.Not, "not"),
        (jn.And, "and"),
        (jn.Or, "or"),
        (jn.Dict, "dict_literal"),
        (jn.List, "list_literal"),
        (jn.Tuple, "tuple_literal"),
    ]:
        if any(True for _ in ast.find_all(node_type)):
            expressions.add(label)
    # Names set inside a for body are loop locals that jinja2.meta still reports as undeclared.
    loop_locals = {
        a.target.name for f in ast.find_all(jn.For) for a in f.find_all(jn.Assign) if isinstance(a.target, jn.Name)
    }
    return {
        "variables": sorted(jinja2.meta.find_undeclared_variables(ast) - {"loop"} - loop_locals),
        "functions": sorted(functions),
        "filters": filters,
        "tests": tests,
        "methods": sorted(methods),
        "loop_attributes": sorted(loop_attrs),
        "statements": sorted(statements),
        "expressions": sorted(expressions),
        "whitespace_control": sorted(
            {m for m in ("{%-", "-%}", "{{-", "-}}", "{#-", "-#}") if m in template}
        ),
    }


def transformers_jinja_environment() -> dict:
    """The environment transformers renders chat templates with, read from a compiled template."""
    env = ctu._compile_jinja_template("{{ 1 }}").environment
    default_env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    tojson = env.filters["tojson"]
    return {
        "source": "transformers/utils/chat_template_utils.py::_cached_compile_jinja_template",
        "class": f"{type(env).__module__}.{type(env).__qualname__}",
        "options": {
            k: getattr(env, k)
            for k in (
                "trim_blocks",
                "lstrip_blocks",
                "keep_trailing_newline",
                "autoescape",
                "block_start_string",
                "block_end_string",
                "variable_start_string",
                "variable_end_string",
                "comment_start_string",
                "comment_end_string",
                "newline_sequence",
            )
        },
        "extensions": sorted(env.extensions),
        "extra_tags": sorted({t for e in env.extensions.values() for t in getattr(e, "tags", ())}),
        "undefined": f"{env.undefined.__module__}.{env.undefined.__qualname__}",
        "filters_overridden_or_added": sorted(
            k for k, v in env.filters.items() if default_env.filters.get(k) is not v
        ),
        "globals_added": sorted(set(env.globals) - set(default_env.globals)),
        "globals_overridden": sorted(
            k for k in set(env.globals) & set(default_env.globals) if env.globals[k] is not default_env.globals[k]
        ),
        "tojson_signature": f"tojson{__import__('inspect').signature(tojson)}",
        "tojson_implementation": "json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, "
        "sort_keys=sort_keys): no HTML escaping, non-ASCII kept, default separators ', ' and ': '",
        "tojson_example": tojson({"a": [1, "é<>&'"], "b": None, "c": True}),
        "context": "messages (None-valued keys dropped from each message), tools (None unless given), documents "
        "(None unless given), add_generation_prompt, every non-None named special token as a string (bos_token, "
        "eos_token, unk_token, sep_token, pad_token, cls_token, mask_token), plus caller kwargs",
    }


def compact_json(obj) -> str:
    """Indented JSON with every list of integers kept on one line."""
    lists: list[str] = []

    def swap(x):
        if isinstance(x, list) and x and all(type(v) is int for v in x):
            lists.append("[" + ",".join(map(str, x)) + "]")
            return f"\x00{len(lists) - 1}\x00"
        if isinstance(x, list):
            return [swap(v) for v in x]
        if isinstance(x, dict):
            return {k: swap(v) for k, v in x.items()}
        return x

    text = json.dumps(swap(obj), ensure_ascii=False, indent=1)
    # A placeholder is a whole JSON string "\u0000<n>\u0000"; real text never contains NUL here.
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: lists[int(m.group(1))], text)


# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer_entry(name: str, version: str, package: str, shas: dict[str, str]) -> dict:
    d = TOKENIZERS_DIR / name
    files = {}
    for f in FILES:
        p = d / f
        if not p.is_file():
            raise SystemExit(f"{p} missing: run scripts/fetch-tokenizers.sh first")
        got = sha256_file(p)
        if got != shas[f"{name}/{f}"]:
            raise SystemExit(f"{p}: sha256 {got} differs from the pin in fetch-tokenizers.sh")
        files[f] = {"sha256": got, "bytes": p.stat().st_size}

    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tj = json.loads((d / "tokenizer.json").read_text())
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(d))
    fast = fast_from_config(d, cfg)

    def kind(x):
        return None if x is None else x.get("type")

    entry: dict = {
        "package": package,
        "version": version,
        "files": files,
        "model_type": tj["model"]["type"],
        "vocab_size_with_added": tk.get_vocab_size(with_added_tokens=True),
        "added_tokens": len(tj["added_tokens"]),
        "normalizer": kind(tj.get("normalizer")),
        "pre_tokenizer": kind(tj.get("pre_tokenizer")),
        "post_processor": kind(tj.get("post_processor")),
        "decoder": kind(tj.get("decoder")),
        "config": {
            k: (v["content"] if isinstance(v, dict) and "content" in v else v)
            for k, v in cfg.items()
            if k
            in (
                "tokenizer_class",
                "add_bos_token",
                "add_eos_token",
                "bos_token",
                "eos_token",
                "pad_token",
                "unk_token",
                "legacy",
                "clean_up_tokenization_spaces",
            )
        },
        "transformers_class": type(auto).__name__,
        "special_tokens": {
            k: {"content": v, "id": tk.token_to_id(v)} for k, v in auto.special_tokens_map.items()
        },
        "notes": [],
    }
    # Parts of the pipeline that transformers' tokenizer class rebuilds differently from tokenizer.json.
    backend = json.loads(auto.backend_tokenizer.to_str())
    rebuilt = {k: backend[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder") if backend[k] != tj[k]}
    for k, v in tj["model"].items():
        if k not in ("vocab", "merges") and backend["model"].get(k) != v:
            rebuilt[f"model.{k}"] = backend["model"].get(k)
    if rebuilt:
        entry["transformers_rebuilt"] = rebuilt

    # -- encode ------------------------------------------------------------------------------------------------
    encode = []
    transformers_differs = 0
    for case, text in COMMON_TEXTS + SPECIAL_TEXTS.get(name, []):
        ids = tk.encode(text, add_special_tokens=False).ids
        ids_sp = tk.encode(text, add_special_tokens=True).ids
        decoded = tk.decode(ids, skip_special_tokens=False)
        item = {"name": case, "text": text, "ids": ids, "ids_with_special": ids_sp, "decoded": decoded}
        if decoded != text:
            item["decoded_differs_from_text"] = True
        # The same through transformers (AutoTokenizer), recorded only where it differs.
        t_ids = auto.encode(text, add_special_tokens=False)
        t_ids_sp = auto.encode(text, add_special_tokens=True)
        t_dec = auto.decode(t_ids, skip_special_tokens=False)
        diff = {}
        if t_ids != ids:
            diff["ids"] = t_ids
        if t_ids_sp != ids_sp:
            diff["ids_with_special"] = t_ids_sp
        if t_dec != decoded:
            diff["decoded"] = t_dec
        if diff:
            item["transformers"] = diff
            transformers_differs += 1
        # PreTrainedTokenizerFast built straight from the two files must agree with the tokenizers library.
        f_ids = fast.encode(text, add_special_tokens=False)
        if f_ids != ids:
            raise SystemExit(f"{name}/{case}: PreTrainedTokenizerFast ids differ from tokenizers: {f_ids} vs {ids}")
        encode.append(item)
    entry["encode"] = encode
    if all(e["ids_with_special"] == e["ids"] for e in encode):
        entry["notes"].append(
            f"add_special_tokens=True adds nothing: the tokenizer.json post_processor is {entry['post_processor']}"
            + (
                " although tokenizer_config.json says add_bos_token=true (transformers "
                f"{transformers.__version__} {type(auto).__name__} adds no BOS either)"
                if cfg.get("add_bos_token")
                else ""
            )
        )
    if cfg.get("clean_up_tokenization_spaces"):
        entry["notes"].append(
            "tokenizer_config.json sets clean_up_tokenization_spaces=true; 'decoded' has no such clean-up "
            f"(the tokenizers library never applies it, and transformers {transformers.__version__} ignores it for BPE)"
        )
    if transformers_differs:
        entry["notes"].append(
            f"transformers {transformers.__version__} {type(auto).__name__} differs from tokenizer.json on "
            f"{transformers_differs} case(s); see 'transformers' in those cases"
        )

    # -- chat --------------------------------------------------------------------------------------------------
    template, note = select_template(cfg)
    if note:
        entry["notes"].append(note)
    if template is None:
        entry["chat"] = None
        return entry
    features = jinja_features(template)
    entry["chat_template"] = {
        "template": template,
        "sha256": sha256_str(template),
        "chars": len(template),
        "uses_strftime_now": "strftime_now" in features["functions"],
        "date_string": DATE_STRING if "strftime_now" in features["functions"] else None,
        "context_special_tokens": dict(auto.special_tokens_map),
        "jinja_features": features,
    }
    variables = set(features["variables"])
    renders = []
    conversations = [(c, m, None) for c, m in CONVERSATIONS]
    if "tools" in variables:
        conversations.append(TOOL_CONVERSATION)
    for conv_name, messages, tools in conversations:
        kwarg_sets = [{}] + [kw for kw in EXTRA_KWARGS.get(name, []) if set(kw) <= variables]
        if tools:
            kwarg_sets = [{}]
        for extra in kwarg_sets:
            for agp in (False, True):
                rendered = auto.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=agp, **extra
                )
                # Same template, same context, through PreTrainedTokenizerFast(**tokenizer_config).
                rendered_fast = fast.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=agp, chat_template=template, **extra
                )
                if rendered_fast != rendered:
                    raise SystemExit(f"{name}/{conv_name}: AutoTokenizer and PreTrainedTokenizerFast renderings differ")
                r = {
                    "name": conv_name,
                    "messages": messages,
                    "add_generation_prompt": agp,
                }
                if tools:
                    r["tools"] = tools
                if extra:
                    r["extra_kwargs"] = extra
                r["rendered"] = rendered
                r["ids"] = tk.encode(rendered, add_special_tokens=False).ids
                renders.append(r)
    entry["chat"] = renders
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    pinned_strftime_now()
    version, packages, shas = read_pins()
    out = {
        "schema": 1,
        "generator": "scripts/make_tokenizer_refs.py",
        "versions": {
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
            "jinja2": jinja2.__version__,
        },
        "pinned_now": PINNED_NOW.isoformat(),
        "date_string": DATE_STRING,
        "jinja_environment": transformers_jinja_environment(),
        "tokenizers": {},
    }
    for name in NAMES:
        print(f"{name} ...", file=sys.stderr)
        out["tokenizers"][name] = build_tokenizer_entry(name, version, packages[name], shas)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = compact_json(out) + "\n"
    assert json.loads(text) == out, "compact_json changed the data"
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(text.encode())} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
