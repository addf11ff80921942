//! `odmoe complete`: one completion from the daemon, streamed to stdout.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result, bail};
use clap::Args;
use odmoe_protocol::{GenerateParams, Method};

use crate::daemon::{self, SamplingArgs, SocketArgs};

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    odmoe complete \"The capital of France is\" --max-tokens 16\n  \
    echo \"Once upon a time\" | odmoe complete --greedy --json\n\n\
    Ctrl-C cancels the completion; what was generated so far is kept.")]
pub struct CompleteArgs {
    /// The prompt; read from stdin when left out (one final line break dropped).
    #[arg(value_name = "TEXT", conflicts_with = "tokens")]
    text: Option<String>,
    /// Prompt as token ids, comma separated (bypasses the tokenizer).
    #[arg(long, value_name = "IDS", value_parser = crate::parse_token_list)]
    tokens: Option<crate::TokenList>,
    /// Keep the KV cache under this name, so a later request with the same prefix reuses it.
    #[arg(long, value_name = "NAME")]
    session: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print the final result {"text", "tokens", "finish_reason", "usage", "timings"} as JSON
    /// instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Print token counts and timings to stderr after the text.
    #[arg(long, short)]
    verbose: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

pub fn run(args: CompleteArgs) -> Result<()> {
    let mut params = GenerateParams {
        session: args.session.clone(),
        ..args.sampling.params()
    };
    match (&args.tokens, &args.text) {
        (Some(ids), _) => params.tokens = Some(ids.0.clone()),
        (None, Some(text)) => params.prompt = Some(text.clone()),
        (None, None) => {
            // `echo TEXT | odmoe complete` means TEXT, not TEXT and a line break.
            let mut text = read_stdin()?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            params.prompt = Some(text);
        }
    }
    params.stream = !args.json;
    let runtime = daemon::runtime()?;
    let result = runtime.block_on(async {
        let mut client = args.socket.connect().await?;
        let mut stdout = std::io::stdout().lock();
        let mut closed = false;
        let result = daemon::generate(
            &mut client,
            Method::Generate,
            &params,
            |event| {
                if !args.json && !closed && !event.text.is_empty() {
                    // A closed stdout (e.g. piped into `head`) stops the printing, not the
                    // request.
                    closed = write!(stdout, "{}", event.text)
                        .and_then(|()| stdout.flush())
                        .is_err();
                }
            },
            daemon::ctrl_c(),
        )
        .await?;
        anyhow::Ok(result)
    })?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&result)?)?;
    } else {
        // The streamed text ends the line; a broken pipe is not worth an error here.
        let _ = writeln!(stdout);
    }
    if args.verbose {
        let usage = &result.usage;
        let timings = &result.timings;
        let decode_s = timings.decode_ms / 1e3;
        eprintln!(
            "{} prompt tokens ({} cached) in {:.0} ms, {} tokens at {:.1} tok/s, {:.0} ms queued ({})",
            usage.prompt_tokens,
            usage.cached_tokens,
            timings.prefill_ms,
            usage.completion_tokens,
            if decode_s > 0.0 {
                f64::from(usage.completion_tokens) / decode_s
            } else {
                0.0
            },
            timings.queue_ms,
            result.finish_reason,
        );
    }
    if result.finish_reason == "cancelled" {
        drop(stdout);
        // The conventional status of a command ended by SIGINT.
        std::process::exit(130);
    }
    Ok(())
}

/// The whole of stdin, which must not be a terminal (someone would be left waiting).
pub fn read_stdin() -> Result<String> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!("no prompt: give TEXT or pipe the prompt into stdin");
    }
    let mut text = String::new();
    stdin
        .read_to_string(&mut text)
        .context("cannot read the prompt from stdin")?;
    Ok(text)
}
