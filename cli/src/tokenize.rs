//! `odmoe tokenize`: a model's tokenizer on the command line, for checking it against others.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

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
    /// Print JSON: {"ids": [...], "tokens": [...]} or {"text": ...}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let tokenizer = odmoe_engine::loader::load_tokenizer(&args.model)?
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
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        );
    }
    Ok(())
}
