//! `odmoe trace import`: routing recorded elsewhere, as a trace file that `trace replay` and the
//! predictor commands read. The JSONL schema is documented in `odmoe_engine::predict::import`.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::DType;
use clap::Args;
use odmoe_config::{Size, format_bytes, parse_size};
use odmoe_engine::predict::import::{ImportOptions, import_jsonl};
use serde_json::json;

#[derive(Args)]
pub struct ImportArgs {
    /// Routing lines, JSONL: `{"layer", "token_idx", "experts": [...], "gating_probs": [...],
    /// "problem_id"}` per token and layer, in any order (`weights`, `token` and `sequence` are
    /// read too).
    routing: PathBuf,
    /// Trace file to write (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Experts per layer, when the routing does not reach the last one.
    #[arg(long, value_name = "N")]
    experts: Option<usize>,
    /// Bytes one expert takes in memory, for the byte figures of replays (Mixtral-8x7B's at 4.5
    /// bits a weight: 99MB).
    #[arg(long, value_name = "SIZE", default_value = "99MB")]
    expert_bytes: String,
    /// Print what was imported as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ImportArgs) -> Result<()> {
    let expert_bytes = match parse_size(&args.expert_bytes) {
        Ok(Size::Bytes(bytes)) if bytes > 0 => bytes,
        Ok(_) => bail!("--expert-bytes: give a size such as 99MB or 1.5GiB"),
        Err(error) => bail!("--expert-bytes: {error}"),
    };
    let file =
        File::open(&args.routing).with_context(|| format!("reading {}", args.routing.display()))?;
    let options = ImportOptions {
        experts: args.experts,
        expert_bytes,
        source: args.routing.display().to_string(),
    };
    let imported = import_jsonl(BufReader::new(file), &options)
        .with_context(|| format!("importing {}", args.routing.display()))?;
    let trace = &imported.trace;
    super::save(trace, &args.out, DType::F16)?;
    if args.json {
        let summary = json!({
            "out": args.out,
            "lines": imported.lines,
            "sequences": imported.sequences,
            "tokens": trace.num_tokens(),
            "incomplete_tokens": imported.incomplete_tokens,
            "layers": trace.num_layers(),
            "experts": trace.num_experts(),
            "experts_per_token": trace.top_k(),
            "expert_bytes": trace.expert_sizes.largest(),
        });
        println!("{summary:#}");
    } else {
        println!(
            "{}: {} tokens of {} sequences from {} lines ({} tokens lacking layers left out), \
             {} layers, top-{} of {} experts of {} each",
            args.out.display(),
            trace.num_tokens(),
            imported.sequences,
            imported.lines,
            imported.incomplete_tokens,
            trace.num_layers(),
            trace.top_k(),
            trace.num_experts(),
            format_bytes(trace.expert_sizes.largest())
        );
    }
    Ok(())
}
