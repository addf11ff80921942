//! GGUF tokenizers against llama.cpp's own vocabulary test vectors: every vocab-only GGUF of
//! llama.cpp's `models/` directory that comes with `.inp`/`.out` files, tokenized as
//! `tests/test-tokenizer-0` does (`llama_tokenize(text, add_special = false, parse_special =
//! false)`), each text's ids compared with the expected line.
//!
//! The SentencePiece vocabulary `ggml-vocab-llama-spm` is committed (tests/fixtures/gguf/vocab);
//! the others come from the llama-cpp-python source package, which scripts/fetch-llama-vocabs.sh
//! (run by scripts/setup.sh) extracts into `${ODMOE_LLAMA_VOCABS_DIR:-$HOME/.cache/odmoe/llama-vocabs}`.
//! Without them the tests that need them fail instead of skipping, so that a run which forgot the
//! fetch cannot pass without checking anything.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use odmoe_engine::format::gguf::GgufFile;
use odmoe_engine::tokenizer::Tokenizer;

/// Whether a vocabulary is expected to reproduce its vectors, or why it cannot.
#[derive(Clone, Copy, Debug)]
enum Expected {
    Pass,
    /// Loading it must fail (with an error naming the unsupported part), for this reason.
    Unsupported(&'static str),
}

/// Every vocabulary with test vectors in llama.cpp's `models/` at the fetched version.
const VOCABS: [(&str, Expected); 15] = [
    (
        "bert-bge",
        Expected::Unsupported(
            "WordPiece (tokenizer.ggml.model \"bert\"): an embedding model's vocabulary, not an \
             MoE language model's",
        ),
    ),
    ("command-r", Expected::Pass),
    ("deepseek-coder", Expected::Pass),
    ("deepseek-llm", Expected::Pass),
    ("falcon", Expected::Pass),
    (
        "gemma-4",
        Expected::Unsupported(
            "tokenizer.ggml.model \"gemma4\": a BPE over raw UTF-8 with \"▁\" for spaces, \
             neither byte-level BPE nor SentencePiece",
        ),
    ),
    ("gpt-2", Expected::Pass),
    ("llama-bpe", Expected::Pass),
    ("llama-spm", Expected::Pass),
    ("mpt", Expected::Pass),
    ("phi-3", Expected::Pass),
    ("qwen2", Expected::Pass),
    ("qwen35", Expected::Pass),
    ("refact", Expected::Pass),
    ("starcoder", Expected::Pass),
];

fn fetched_dir() -> PathBuf {
    common::fetched("ODMOE_LLAMA_VOCABS_DIR", "llama-vocabs")
}

fn committed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/vocab")
}

/// The fetched `ggml-vocab-<name>.gguf`; panics (never skips) when it is absent.
fn fetched_vocab(name: &str) -> PathBuf {
    let path = fetched_dir().join(format!("ggml-vocab-{name}.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-llama-vocabs.sh first (scripts/setup.sh runs it; it fills \
         {}; set ODMOE_LLAMA_VOCABS_DIR to use another directory)",
        path.display(),
        fetched_dir().display()
    );
    path
}

/// The texts of `<vocab>.inp` and the ids of `<vocab>.out`, read as test-tokenizer-0 reads them:
/// texts end with `"\n__ggml_vocab_test__\n"`, and each `.out` line is the ids separated by
/// spaces.
fn read_vectors(vocab: &Path) -> Vec<(String, Vec<u32>)> {
    let with_suffix = |suffix: &str| {
        let mut path = vocab.as_os_str().to_owned();
        path.push(suffix);
        PathBuf::from(path)
    };
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let inputs = read(with_suffix(".inp"));
    let outputs = read(with_suffix(".out"));
    let texts: Vec<&str> = inputs
        .strip_suffix("\n__ggml_vocab_test__\n")
        .expect(".inp ends with the separator")
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let ids: Vec<Vec<u32>> = outputs
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|id| id.parse().expect("an id"))
                .collect()
        })
        .collect();
    assert_eq!(texts.len(), ids.len(), "{}: .inp and .out", vocab.display());
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

fn load(vocab: &Path) -> odmoe_engine::Result<Tokenizer> {
    Tokenizer::from_gguf(&GgufFile::open(vocab, &Device::Cpu)?)
}

/// Runs every vector of `vocab`; returns how many there were.
fn check_vectors(vocab: &Path) -> usize {
    let tokenizer = load(vocab).unwrap_or_else(|e| panic!("{}: {e}", vocab.display()));
    let vectors = read_vectors(vocab);
    let mut failures = Vec::new();
    for (text, expected) in &vectors {
        match tokenizer.encode(text, false) {
            Ok(ids) if &ids == expected => {}
            Ok(ids) => failures.push(format!(
                "  {text:?}:\n    got      {ids:?}\n    expected {expected:?}"
            )),
            Err(e) => failures.push(format!("  {text:?}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{}: {} of {} vectors differ:\n{}",
        vocab.display(),
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
    vectors.len()
}

fn check(name: &str) {
    let expected = VOCABS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} is not listed in VOCABS"))
        .1;
    let vocab = fetched_vocab(name);
    match expected {
        Expected::Pass => {
            let count = check_vectors(&vocab);
            assert!(count >= 40, "{name}: only {count} vectors");
        }
        Expected::Unsupported(reason) => match load(&vocab) {
            Ok(_) => panic!(
                "{name} loads although it is listed as unsupported ({reason}): run its vectors \
                 and list it as Expected::Pass"
            ),
            Err(e) => eprintln!("{name}: unsupported ({reason}): {e}"),
        },
    }
}

/// Every vocabulary that has vectors in the fetched directory is listed in VOCABS, so that none
/// is left out unnoticed.
#[test]
fn every_fetched_vocab_with_vectors_is_listed() {
    let dir = fetched_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/fetch-llama-vocabs.sh first (scripts/setup.sh runs it)",
            dir.display()
        )
    });
    let mut names: Vec<String> = entries
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|file| {
            file.strip_prefix("ggml-vocab-")?
                .strip_suffix(".gguf.inp")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    let listed: Vec<&str> = VOCABS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        listed,
        "vocabularies with vectors in {}",
        dir.display()
    );
}

/// The committed SentencePiece vocabulary runs its vectors with no fetch.
#[test]
fn committed_llama_spm() {
    let count = check_vectors(&committed_dir().join("ggml-vocab-llama-spm.gguf"));
    assert_eq!(count, 46);
}

macro_rules! vocab_tests {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            check($name);
        }
    )*};
}

vocab_tests! {
    bert_bge => "bert-bge",
    command_r => "command-r",
    deepseek_coder => "deepseek-coder",
    deepseek_llm => "deepseek-llm",
    falcon => "falcon",
    gemma_4 => "gemma-4",
    gpt_2 => "gpt-2",
    llama_bpe => "llama-bpe",
    llama_spm => "llama-spm",
    mpt => "mpt",
    phi_3 => "phi-3",
    qwen2 => "qwen2",
    qwen35 => "qwen35",
    refact => "refact",
    starcoder => "starcoder",
}

/// Decoding the SentencePiece vectors gives their texts back (byte fallback reassembles what the
/// vocabulary lacks, and the prepended space is dropped), and after a BOS token the space stays,
/// as llama.cpp's `detokenize` keeps it.
#[test]
fn committed_llama_spm_decodes_as_llama_cpp() {
    let vocab = committed_dir().join("ggml-vocab-llama-spm.gguf");
    let tokenizer = load(&vocab).unwrap();
    let mut failures = Vec::new();
    let vectors = read_vectors(&vocab);
    for (text, ids) in &vectors {
        match tokenizer.decode(ids, false) {
            Ok(decoded) if &decoded == text => {}
            Ok(decoded) => failures.push(format!("  {text:?}: decoded {decoded:?}")),
            Err(e) => failures.push(format!("  {text:?}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} texts decode differently:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
    let ids = tokenizer.encode("Hello world", true).unwrap();
    assert_eq!(ids[0], 1, "BOS first: {ids:?}");
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), " Hello world");
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "<s> Hello world");
    assert_eq!(tokenizer.decode(&ids[1..], true).unwrap(), "Hello world");
}
