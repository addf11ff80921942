//! `odmoe`: the command line. Offline developer tools run the engine directly (`run`, `logits`);
//! commands that talk to a running `odmoed` come through the client library.

mod bench;
mod chat;
mod complete;
mod convert;
mod daemon;
mod http_key;
mod inspect;
mod logits;
mod manage;
mod model_args;
mod models;
mod perplexity;
mod predictor;
mod pressure;
mod run;
mod service;
mod stats;
mod tokenize;
mod trace;
mod verify;

use clap::{Parser, Subcommand};

/// Blocks of megabytes (a prompt's tensors) on huge pages: see the allocator's documentation.
#[global_allocator]
static ALLOCATOR: odmoe_engine::allocator::HugePageBlocks = odmoe_engine::allocator::HugePageBlocks;

#[derive(Parser)]
#[command(
    name = "odmoe",
    version,
    about = "Run Mixture-of-Experts language models larger than memory",
    long_about = "Run Mixture-of-Experts language models larger than memory.\n\n\
        `odmoe run` and `odmoe logits` load a model in this process; they are the hooks that \
        reference checks and scripts use, and their flags are stable.\n\n\
        `chat`, `complete`, `stats`, `ps`, `models`, `load`, `unload`, `stop` and `pressure` \
        talk to a \
        running `odmoed` \
        over its socket (--socket or $ODMOE_SOCKET, else the configured one); `odmoe service \
        install` makes odmoed start when a client first connects."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (or token ids) and stream it to stdout.
    Run(run::RunArgs),
    /// Write the logits (and optionally hidden states) of every position to a safetensors file.
    Logits(logits::LogitsArgs),
    /// Encode text to token ids (or decode ids) with a model's tokenizer.
    Tokenize(tokenize::TokenizeArgs),
    /// Perplexity of a model on a text file (compare variants of one model).
    Perplexity(perplexity::PerplexityArgs),
    /// Convert a Hugging Face checkpoint into the odmoe layout (resumes an interrupted run).
    Convert(convert::ConvertArgs),
    /// Re-hash every file of an odmoe layout against its manifest; fails on any mismatch.
    Verify(verify::VerifyArgs),
    /// Show a model's shape, expert sizes and the memory it needs with an expert budget.
    Inspect(inspect::InspectArgs),
    /// Measure the expert store (reads, hits, decode at several budgets).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Record routing traces; replay them through the expert store's cache against Belady.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// Train the shadow expert predictor; measure recall, latency and live prefetch.
    #[command(subcommand)]
    Predictor(predictor::PredictorCommand),
    /// Chat with the daemon's model: interactive on a terminal, one reply for piped stdin.
    Chat(chat::ChatArgs),
    /// Complete a prompt (TEXT or stdin) with the daemon's model, streaming the text.
    Complete(complete::CompleteArgs),
    /// Show the daemon's model, expert budget, cache hit rate, reads, queue and sessions.
    Stats(stats::StatsArgs),
    /// Show what the daemon has loaded: model, expert memory against budget, sessions, queue.
    Ps(stats::PsArgs),
    /// List the models in the daemon's models folder (`model.models_dir`) and the one loaded.
    Models(models::ModelsArgs),
    /// Make the daemon serve another model, by path or by its name in the models folder.
    Load(manage::LoadArgs),
    /// Make the daemon let go of its model and the memory it holds.
    Unload(manage::UnloadArgs),
    /// Stop the daemon gracefully.
    Stop(manage::StopArgs),
    /// Show the daemon's memory pressure, or simulate it (the expert budget follows).
    #[command(subcommand)]
    Pressure(pressure::PressureCommand),
    /// Run odmoed as a per-user service (systemd on Linux, launchd on macOS).
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// Print the key OpenAI- and Anthropic-compatible clients send to odmoed's HTTP APIs.
    HttpKey(http_key::HttpKeyArgs),
}

fn main() -> std::process::ExitCode {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { odmoe_engine::configure_cpu_compute() };
    odmoe_engine::allocator::configure_system_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Trace(command) => trace::run(command),
        Command::Predictor(command) => predictor::run(command),
        Command::Chat(args) => chat::run(args),
        Command::Complete(args) => complete::run(args),
        Command::Stats(args) => stats::run(args),
        Command::Ps(args) => stats::ps(args),
        Command::Models(args) => models::run(args),
        Command::Load(args) => manage::load(args),
        Command::Unload(args) => manage::unload(args),
        Command::Stop(args) => manage::stop(args),
        Command::Pressure(command) => pressure::run(command),
        Command::Service(command) => service::run(command),
        Command::HttpKey(args) => http_key::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("odmoe: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Token ids given on the command line as `1,2,3`, or as `@FILE` holding such a list (a long
/// prompt's ids exceed what one command-line argument may hold).
#[derive(Clone, Debug)]
pub struct TokenList(pub Vec<u32>);

/// Parses `1,2,3`, or the contents of FILE for `@FILE`, into token ids.
pub fn parse_token_list(text: &str) -> Result<TokenList, String> {
    let listed = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => text.to_owned(),
    };
    let ids: Result<Vec<u32>, String> = listed
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| format!("{s:?} is not a token id"))
        })
        .collect();
    match ids {
        Ok(ids) if ids.is_empty() => Err("expected at least one token id, as in 1,2,3".into()),
        other => other.map(TokenList),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists_parse_or_explain() {
        assert_eq!(parse_token_list("1, 2,3").unwrap().0, vec![1, 2, 3]);
        assert!(parse_token_list("1,x").unwrap_err().contains("\"x\""));
        assert!(parse_token_list("").is_err());
        let file = std::env::temp_dir().join(format!("odmoe-ids-{}", std::process::id()));
        std::fs::write(&file, "4,5,\n6\n").unwrap();
        let listed = parse_token_list(&format!("@{}", file.display()));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(listed.unwrap().0, vec![4, 5, 6]);
        assert!(
            parse_token_list("@/no/such/ids")
                .unwrap_err()
                .contains("/no/such/ids")
        );
    }

    #[test]
    fn help_is_complete() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
