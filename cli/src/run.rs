//! `odmoe run`: load a model in this process and generate.

use std::io::Write;

use anyhow::{Result, bail};
use clap::Args;
use odmoe_engine::generate::{GenerateRequest, ReplyForm, SamplingParams, Session};
use odmoe_engine::tokenizer::ChatMessage;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    prompt: Option<String>,
    /// Prompt as token ids, comma separated (bypasses the tokenizer).
    #[arg(long, value_name = "IDS", value_parser = crate::parse_token_list)]
    tokens: Option<crate::TokenList>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the top probability (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalise tokens already in the context (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Always pick the most likely token (same as --temp 0).
    #[arg(long)]
    greedy: bool,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object {"tokens", "text", "finish_reason", "usage", "timings"} instead of
    /// streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: RunArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let tokenizer = loaded.tokenizer.as_deref();
    let prompt = match (&args.tokens, &args.prompt) {
        (Some(ids), _) => ids.0.clone(),
        (None, Some(text)) => {
            let Some(tokenizer) = tokenizer else {
                bail!(
                    "{} has no tokenizer: use --tokens to give token ids",
                    args.model.model.display()
                );
            };
            if args.chat {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(ChatMessage::new("system", system));
                }
                messages.push(ChatMessage::new("user", text));
                tokenizer.encode_chat(&messages)?
            } else {
                tokenizer.encode(text, true)?
            }
        }
        (None, None) => unreachable!("clap requires --prompt or --tokens"),
    };
    let request = GenerateRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: if args.greedy { 0.0 } else { args.temperature },
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repeat_penalty,
            seed: args.seed,
        },
        stop: args.stop.clone(),
        stop_token_ids: Vec::new(),
        reply: if args.chat {
            ReplyForm::ChatAnswer
        } else {
            ReplyForm::Completion
        },
        ignore_eos: args.ignore_eos,
    };
    let mut session = Session::new(model);
    let mut stdout = std::io::stdout().lock();
    let generation = session.generate(model, tokenizer, &request, |delta| {
        if !args.json && !delta.text.is_empty() {
            // A closed stdout (e.g. piped into `head`) ends the generation.
            return write!(stdout, "{}", delta.text)
                .and_then(|_| stdout.flush())
                .is_ok();
        }
        true
    })?;
    let completion = generation.tokens.len();
    if args.json {
        let out = serde_json::json!({
            "tokens": generation.tokens,
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": completion,
                "cached_tokens": generation.cached_tokens,
            },
            "timings": generation.timings,
            "store": loaded.store.as_ref().map(|s| s.stats()),
        });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
        let decode_s = generation.timings.decode_ms / 1e3;
        eprintln!(
            "{} prompt tokens in {:.0} ms, {} tokens at {:.1} tok/s ({:?})",
            generation.prompt_tokens,
            generation.timings.prefill_ms,
            completion,
            if decode_s > 0.0 {
                completion as f64 / decode_s
            } else {
                0.0
            },
            generation.finish_reason,
        );
        if let Some(store) = &loaded.store {
            let s = store.stats();
            eprintln!(
                "experts: {} hits, {} misses, {} evictions, {} read, {:.1} ms stalled",
                s.hits,
                s.misses,
                s.evictions,
                odmoe_config::format_bytes(s.bytes_read),
                s.stall_us as f64 / 1e3,
            );
        }
    }
    Ok(())
}
