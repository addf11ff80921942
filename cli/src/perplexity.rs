//! `odmoe perplexity`: how well a model predicts a text, for comparing variants of one model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// Text file to score.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per scoring window (each window starts from an empty cache).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Print {"perplexity", "nll", "scored_tokens"} as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let tokenizer = odmoe_engine::open::load_tokenizer(&args.model.model)?
        .with_context(|| format!("{} has no tokenizer", args.model.model.display()))?;
    let tokens = tokenizer.encode(&text, false)?;
    let loaded = args.model.load()?;
    let result = odmoe_engine::eval::perplexity(&loaded.model, &tokens, args.window)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "perplexity {:.3} (mean NLL {:.4} nats over {} tokens)",
            result.perplexity, result.nll, result.scored_tokens
        );
    }
    Ok(())
}
