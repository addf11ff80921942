//! `odmoe logits`: every position's logits (and hidden states) for a token sequence, written as
//! safetensors so that outside checks can compare them with a reference.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use odmoe_engine::model::{ForwardTrace, Logits};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// Token ids, comma separated.
    #[arg(long, value_name = "IDS", value_parser = crate::parse_token_list)]
    tokens: crate::TokenList,
    /// Output file: tensor `logits` f32 [T, vocab].
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Also write `hidden_states` f32 [layers + 1, T, hidden]: entry l is the state entering layer
    /// l, the last is the final layer's output before the final norm.
    #[arg(long)]
    hidden: bool,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let mut cache = model.new_cache();
    let mut trace = ForwardTrace::default();
    let logits = model.forward(&args.tokens.0, &mut cache, Logits::All, Some(&mut trace))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("logits".into(), logits);
    if args.hidden {
        tensors.insert(
            "hidden_states".into(),
            Tensor::stack(&trace.hidden_states, 0)?,
        );
    }
    // Write beside the target and rename, so a reader never sees a partial file.
    let partial = args.out.with_extension("safetensors.partial");
    candle_core::safetensors::save(&tensors, &partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("renaming {} to {}", partial.display(), args.out.display()))?;
    Ok(())
}
