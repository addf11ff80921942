//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, rebuilt as a Hugging Face
//! `tokenizer.json` document that encodes as llama.cpp's `llama-vocab.cpp` does:
//!
//! * `gpt2`: byte-level BPE over the file's merges, split first by the pre-tokenizer expressions
//!   llama.cpp uses for the file's `tokenizer.ggml.pre`;
//! * `llama`: SentencePiece (llama.cpp's `llm_tokenizer_spm`): spaces become "▁" (with one
//!   prepended unless `add_space_prefix` is false), then adjacent pieces merge while their
//!   concatenation is a token, highest score first, and characters left outside the vocabulary
//!   fall back to `<0xNN>` byte tokens.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::format::gguf::GgufFile;

/// llama.cpp's `llama_token_type`, as stored in `tokenizer.ggml.token_type`.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// A GGUF vocabulary as a `tokenizer.json` document, with what the document cannot say.
pub(super) struct GgufTokenizer {
    pub json: Value,
    pub bos: Option<usize>,
    pub eos: Option<usize>,
    /// The text of every token, by id.
    pub tokens: Vec<String>,
    /// Decoding drops one leading space from the text unless the first token is a special one
    /// (llama.cpp's `detokenize` with `add_space_prefix`): the space that encoding prepended.
    pub strip_leading_space: bool,
}

/// Reads the vocabulary; an error message names what is missing or not supported.
pub(super) fn read(gguf: &GgufFile) -> std::result::Result<GgufTokenizer, String> {
    let text = |e: crate::error::Error| e.to_string();
    let model = gguf.meta_str("tokenizer.ggml.model").map_err(text)?;
    let tokens: Vec<String> = gguf
        .meta_strings("tokenizer.ggml.tokens")
        .map_err(text)?
        .into_iter()
        .map(str::to_string)
        .collect();
    let types: Vec<i32> = match gguf.meta_array("tokenizer.ggml.token_type") {
        Ok(values) => values
            .iter()
            .map(|v| v.to_i32().unwrap_or(TOKEN_NORMAL))
            .collect(),
        Err(_) => vec![TOKEN_NORMAL; tokens.len()],
    };
    let token_id = |key: &str| gguf.meta_usize(key).ok().filter(|&id| id < tokens.len());
    let bos = token_id("tokenizer.ggml.bos_token_id");
    let eos = token_id("tokenizer.ggml.eos_token_id");
    // What llama.cpp adds around a text when asked to: its default for the vocabulary type (and
    // for some pre-tokenizers), unless the file says otherwise.
    let add_special = |default_bos: bool| {
        let add_bos = gguf
            .meta_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(default_bos);
        let add_eos = gguf
            .meta_bool("tokenizer.ggml.add_eos_token")
            .unwrap_or(false);
        (
            add_bos.then_some(bos).flatten(),
            add_eos.then_some(eos).flatten(),
        )
    };
    let added = added_tokens(&tokens, &types, &model_name(gguf));
    let (json, strip_leading_space) = match model {
        "gpt2" => {
            let merges = gguf.meta_strings("tokenizer.ggml.merges").map_err(text)?;
            let pre = gguf.meta_str("tokenizer.ggml.pre").unwrap_or("default");
            let pre_tokenizer = bpe_pre_tokenizer(pre).ok_or_else(|| {
                format!("pre-tokenizer {pre:?} (tokenizer.ggml.pre) is not supported yet")
            })?;
            let (bos, eos) = add_special(pre_tokenizer.add_bos);
            let json = bpe_tokenizer_json(&tokens, &merges, added, &pre_tokenizer);
            (with_post_processor(json, &tokens, bos, eos), false)
        }
        "llama" => {
            let scores: Vec<f32> = gguf
                .meta_array("tokenizer.ggml.scores")
                .map_err(text)?
                .iter()
                .map(|v| {
                    v.to_f32()
                        .map_err(|e| format!("tokenizer.ggml.scores: {e}"))
                })
                .collect::<std::result::Result<_, _>>()?;
            if scores.len() != tokens.len() {
                return Err(format!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                ));
            }
            let unk = token_id("tokenizer.ggml.unknown_token_id");
            let add_space_prefix = gguf
                .meta_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true);
            let (bos, eos) = add_special(true);
            let json = spm_tokenizer_json(&tokens, &scores, added, unk, add_space_prefix);
            (
                with_post_processor(json, &tokens, bos, eos),
                add_space_prefix,
            )
        }
        other => {
            return Err(format!(
                "tokenizer.ggml.model {other:?} is not supported (only \"gpt2\" byte-level BPE and \
                 \"llama\" SentencePiece vocabularies)"
            ));
        }
    };
    Ok(GgufTokenizer {
        json,
        bos,
        eos,
        tokens,
        strip_leading_space,
    })
}

fn model_name(gguf: &GgufFile) -> String {
    gguf.meta_str("general.name")
        .unwrap_or_default()
        .to_lowercase()
}

/// Control, unknown and user-defined tokens, which llama.cpp matches whole in the text before
/// tokenizing the rest (`tokenizer_st_partition`). Phi-3's are right-stripped (they swallow the
/// whitespace after them) except `<unk>`, `<s>` and `<|endoftext|>`: llama.cpp sets that by model
/// name, since GGUF files do not record it.
fn added_tokens(tokens: &[String], types: &[i32], model_name: &str) -> Vec<Value> {
    let phi3 = model_name.contains("phi-3") || model_name.contains("phi3");
    tokens
        .iter()
        .enumerate()
        .filter_map(|(id, token)| {
            let kind = *types.get(id)?;
            if !matches!(kind, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED) {
                return None;
            }
            let rstrip = phi3 && !matches!(token.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
            Some(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": rstrip, "normalized": false, "special": kind != TOKEN_USER_DEFINED,
            }))
        })
        .collect()
}

/// How llama.cpp pre-tokenizes one family of `tokenizer.ggml.pre` values (`llm_tokenizer_bpe`).
struct BpePreTokenizer {
    /// Regular expressions applied one after the other, each splitting the pieces of the
    /// previous into matches and the text between them (`unicode_regex_split`).
    expressions: &'static [&'static str],
    /// A piece that is a token as a whole is not split by merges.
    ignore_merges: bool,
    /// llama.cpp adds the BOS token by default for this family.
    add_bos: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Chinese, Korean and other CJK runs, as DeepSeek's first tokenizers isolate them.
const DEEPSEEK_CJK: &str = r"[一-龥ࠀ-一가-퟿]+";

/// llama.cpp's expressions for a `tokenizer.ggml.pre` value (llama-vocab.cpp, `llama_vocab::impl::
/// load` for the names, `llm_tokenizer_bpe` for the expressions), copied byte for byte: some
/// ranges end in characters that Unicode normalization would rewrite (U+1F7D to U+03CE, leaving
/// an empty range), so this file must not be normalized. Families with
/// custom splitting code in llama.cpp (kimi-k2, afmoe, ...) or special handling beyond these
/// (chatglm, gemma4, ...) are not listed.
fn bpe_pre_tokenizer(pre: &str) -> Option<BpePreTokenizer> {
    let family = |expressions, ignore_merges, add_bos| BpePreTokenizer {
        expressions,
        ignore_merges,
        add_bos,
    };
    Some(match pre {
        "default" => family(
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => family(&[LLAMA3], true, true),
        "dbrx" | "smaug-bpe" => family(&[LLAMA3], false, false),
        "deepseek-llm" => family(
            &[
                r"[\r\n]",
                r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                r"\s+$",
                DEEPSEEK_CJK,
                r"\p{N}+",
            ],
            false,
            false,
        ),
        "deepseek-coder" => family(
            &[
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                DEEPSEEK_CJK,
                r"\p{N}",
            ],
            false,
            false,
        ),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => family(
            &[
                r"\p{N}{1,3}",
                r"[一-龥぀-ゟ゠-ヿ]+",
                r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
            ],
            false,
            false,
        ),
        "falcon" => family(
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => family(&[r"\p{N}", GPT2], false, false),
        "gpt-2" | "phi-2" | "gigachat" | "a.x-4.0" | "mellum" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" | "exaone4" => family(&[GPT2], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => family(&[QWEN2], false, false),
        "qwen35" => family(
            &[
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
            false,
            false,
        ),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => family(
            &[
                r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
            false,
            false,
        ),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => family(
            &[
                r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
            ],
            false,
            false,
        ),
        _ => return None,
    })
}

/// A Hugging Face `tokenizer.json` for a byte-level BPE vocabulary.
fn bpe_tokenizer_json(
    tokens: &[String],
    merges: &[&str],
    added: Vec<Value>,
    pre_tokenizer: &BpePreTokenizer,
) -> Value {
    let mut pre: Vec<Value> = pre_tokenizer
        .expressions
        .iter()
        .map(|e| json!({"type": "Split", "pattern": {"Regex": e}, "behavior": "Isolated", "invert": false}))
        .collect();
    pre.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre_tokenizer.ignore_merges, "vocab": vocabulary(tokens), "merges": merges,
        },
    })
}

/// Token text to id; where a text appears twice the later id wins, as in llama.cpp's map.
fn vocabulary(tokens: &[String]) -> Map<String, Value> {
    tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), Value::from(id)))
        .collect()
}

/// A Hugging Face `tokenizer.json` for a SentencePiece vocabulary, encoding as llama.cpp's
/// `llm_tokenizer_spm` does.
///
/// llama.cpp merges any two adjacent pieces whose concatenation is a token, the one with the
/// highest score first. A BPE model does the same given every such pair as a merge, ranked by
/// the score of the token it makes; pairs making equally scored tokens are ranked by that token's
/// id, then by the ids of the two halves (the order Hugging Face's converter gives them).
fn spm_tokenizer_json(
    tokens: &[String],
    scores: &[f32],
    added: Vec<Value>,
    unk: Option<usize>,
    add_space_prefix: bool,
) -> Value {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_str(), id))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if ids.get(token.as_str()) != Some(&id) {
            continue; // a duplicate text: llama.cpp only ever finds the later id
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((scores[id], id, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then((a.2, a.3).cmp(&(b.2, b.3)))
    });
    let merges: Vec<[&str; 2]> = merges
        .iter()
        .map(|&(_, _, l, r)| [tokens[l].as_str(), tokens[r].as_str()])
        .collect();
    let escape_spaces = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, escape_spaces]})
    } else {
        escape_spaces
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        // The leading space that encoding prepended is dropped by `Tokenizer::decode`, which
        // knows whether the first token was a special one; a decoder here would not.
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk.map(|id| tokens[id].as_str()),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocabulary(tokens),
            "merges": merges,
        },
    })
}

/// Adds the BOS and EOS tokens llama.cpp puts around a text when asked for special tokens.
fn with_post_processor(
    mut json: Value,
    tokens: &[String],
    bos: Option<usize>,
    eos: Option<usize>,
) -> Value {
    if bos.is_none() && eos.is_none() {
        return json;
    }
    let special =
        |id: usize, type_id: u32| json!({"SpecialToken": {"id": tokens[id], "type_id": type_id}});
    let sequence = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    single.extend(bos.map(|id| special(id, 0)));
    single.push(sequence("A", 0));
    single.extend(eos.map(|id| special(id, 0)));
    pair.extend(single.iter().cloned());
    pair.extend(bos.map(|id| special(id, 1)));
    pair.push(sequence("B", 1));
    pair.extend(eos.map(|id| special(id, 1)));
    let special_tokens: Map<String, Value> = [bos, eos]
        .into_iter()
        .flatten()
        .map(|id| {
            let token = &tokens[id];
            (
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            )
        })
        .collect();
    json["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    });
    json
}
