//! `odmoe tokenize`: a model's tokenizer on the command line, for checking it against others.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use odmoe_engine::tokenizer::{DecodeStream, Tokenizer};

#[derive(Args)]
pub struct TokenizeArgs {
    /// Model: a Hugging Face directory, an odmoe layout or a GGUF file.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Text to encode (reads stdin when absent).
    text: Option<String>,
    /// Add the model's special tokens (e.g. BOS) as its tokenizer is configured to.
    #[arg(long)]
    special: bool,
    /// Decode comma-separated ids instead of encoding text.
    #[arg(long, value_name = "IDS", value_parser = crate::parse_token_list, conflicts_with = "text")]
    decode: Option<crate::TokenList>,
    /// Print JSON: {"ids": [...], "tokens": [...]}, where tokens[i] is the text id i adds when
    /// the ids are decoded in order (joined, they are the decoded text); with --decode,
    /// {"text": ...}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let tokenizer = odmoe_engine::open::load_tokenizer(&args.model)?
        .with_context(|| format!("{} has no tokenizer", args.model.display()))?;
    if let Some(ids) = &args.decode {
        let text = tokenizer.decode(&ids.0, false)?;
        if args.json {
            println!("{}", serde_json::json!({ "text": text }));
        } else {
            println!("{text}");
        }
        return Ok(());
    }
    let text = match args.text {
        Some(text) => text,
        None => std::io::read_to_string(std::io::stdin()).context("reading stdin")?,
    };
    let ids = tokenizer.encode(&text, args.special)?;
    if args.json {
        let tokens = token_texts(&tokenizer, &ids)?;
        println!("{}", serde_json::json!({ "ids": ids, "tokens": tokens }));
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        );
    }
    Ok(())
}

/// The text each of `ids` adds to the decoded text, in order. A token ending inside a multi-byte
/// character adds nothing and the token completing it adds the whole character, so that the
/// texts joined are exactly the decoded text.
fn token_texts(tokenizer: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let mut stream = DecodeStream::new(tokenizer, false);
    let mut texts = ids
        .iter()
        .map(|&id| Ok(stream.step(id)?.unwrap_or_default()))
        .collect::<Result<Vec<String>>>()?;
    if let (Some(rest), Some(last)) = (stream.flush()?, texts.last_mut()) {
        last.push_str(&rest);
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn token_texts_join_into_the_decoded_text() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe");
        let tokenizer = Tokenizer::from_dir(&fixture).unwrap();
        let text = "The quick brown fox, naïve café 🦊!";
        let ids = tokenizer.encode(text, false).unwrap();
        let texts = token_texts(&tokenizer, &ids).unwrap();
        assert_eq!(texts.len(), ids.len());
        assert_eq!(texts.concat(), tokenizer.decode(&ids, false).unwrap());
        assert!(
            texts.iter().filter(|t| !t.is_empty()).count() > 1,
            "{texts:?}"
        );
    }
}
