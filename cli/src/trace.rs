//! `odmoe trace record`, `odmoe trace replay` and `odmoe trace import` (in `import.rs`): routing
//! traces, and the store's own cache bookkeeping replayed over them to compare eviction policies
//! and predictors with the Belady bound.

mod import;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::DType;
use clap::{Args, Subcommand};
use odmoe_config::format_bytes;
use odmoe_engine::open::{self, ExpertMode, LoadOptions, LoadedModel};
use odmoe_engine::predict::replay::{Prefetch, ReplayOptions, ReplayPolicy, ReplayReport, replay};
use odmoe_engine::predict::trace::{RecordOptions, Trace};
use odmoe_engine::predict::{Predictor, PredictorKind, lookahead::Lookahead, shadow::Shadow};
use odmoe_engine::store::budget::parse_budget;
use odmoe_engine::store::{ExpertSizes, PolicyKind, StoreConfig};
use serde_json::json;

#[derive(Subcommand)]
pub enum TraceCommand {
    /// Run prompts (one per line) and record each token's experts, weights and hidden states.
    Record(RecordArgs),
    /// Replay a trace through the store's cache: hit rate, reads, prefetch and stall estimates.
    Replay(ReplayArgs),
    /// Read a routing trace recorded elsewhere (JSONL, one line per token and layer) into a trace
    /// file, for replay and predictor evaluation.
    Import(import::ImportArgs),
}

#[derive(Args)]
pub struct RecordArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// Prompts, one per line (empty lines are skipped).
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Trace file to write (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Also record the hidden state entering every layer (needed to train and replay predictors).
    #[arg(long)]
    hidden: bool,
    /// How hidden states are stored.
    #[arg(long, default_value = "f16", value_name = "f16|f32", value_parser = parse_dtype)]
    hidden_dtype: DType,
    /// Greedy tokens generated after each prompt, so decode routing is recorded too.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_tokens: usize,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => Err(format!("{other:?}: expected f16 or f32")),
    }
}

#[derive(Args)]
pub struct ReplayArgs {
    /// Trace recorded by `odmoe trace record`.
    trace: PathBuf,
    /// Expert budget: bytes (64MiB) or a percentage of all experts (25%). Required unless
    /// --sweep is given.
    #[arg(long, value_name = "SIZE|PCT", required_unless_present = "sweep")]
    budget: Option<String>,
    /// Eviction policies (comma separated): reuse (the expert store's default: evicts the expert
    /// whose next use is expected last, from its layer's place in the cycle and its history of
    /// use), cycle (evicts the expert whose layer comes round last), lru (least recently used),
    /// lfuda (least frequently used with aging), belady (the offline optimum).
    #[arg(
        long,
        default_values_t = [ReplayPolicy::from(PolicyKind::default())],
        value_delimiter = ',',
        value_name = "POLICY"
    )]
    policy: Vec<ReplayPolicy>,
    /// Where prefetches come from: none, lookahead (needs --model), shadow (needs --weights),
    /// history (the routing so far: needs no hidden states, so it runs on imported traces), or
    /// oracle (the trace's own future: the bound for any predictor). Comma separated to compare.
    #[arg(
        long,
        default_value = "none",
        value_delimiter = ',',
        value_name = "KIND"
    )]
    prefetch: Vec<PrefetchArg>,
    /// Layers ahead to prefetch.
    #[arg(long, default_value_t = 1, value_name = "D")]
    depth: usize,
    /// The model the trace was recorded from (for the lookahead predictor's routers).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    #[command(flatten)]
    tuning: PrefetchTuning,
    /// Disk read rate of the stall model, GB/s.
    #[arg(long, default_value_t = 2.0, value_name = "X")]
    disk_gbps: f64,
    /// Compute time of one layer for one token in the stall model, ms.
    #[arg(long, default_value_t = 0.4, value_name = "Y")]
    compute_ms: f64,
    /// Replay at each of these budgets (sizes or percentages) and print a hit-rate table.
    #[arg(long, value_delimiter = ',', value_name = "B1,B2,..")]
    sweep: Vec<String>,
    /// Print JSON (one object per replay, in an array) instead of a table.
    #[arg(long)]
    json: bool,
}

/// A prefetch source named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchArg {
    Predictor(PredictorKind),
    Oracle,
}

impl std::str::FromStr for PrefetchArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oracle" => Ok(Self::Oracle),
            other => other.parse().map(Self::Predictor),
        }
    }
}

pub fn run(command: TraceCommand) -> Result<()> {
    match command {
        TraceCommand::Record(args) => record(args),
        TraceCommand::Replay(args) => replay_command(args),
        TraceCommand::Import(args) => import::run(args),
    }
}

/// Writes `trace` to `out` through a temporary name, renamed once complete.
pub(crate) fn save(trace: &Trace, out: &Path, hidden_dtype: DType) -> Result<()> {
    let partial = out.with_extension("safetensors.partial");
    trace
        .save(&partial, hidden_dtype)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))
}

/// Non-empty lines of a prompts file.
pub(crate) fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        bail!("{} has no prompts (one per line)", path.display());
    }
    Ok(prompts)
}

/// Bytes one expert of each layer takes in the store's budget.
pub(crate) fn expert_sizes(path: &Path) -> Result<ExpertSizes> {
    Ok(open::expert_sizes_on(path, &odmoe_engine::default_device()?)?.1)
}

/// One expert's bytes for a summary line: its size, or the range where layers differ.
pub(crate) fn describe_sizes(sizes: &ExpertSizes) -> String {
    match sizes {
        ExpertSizes::Same(bytes) => format_bytes(*bytes),
        ExpertSizes::ByLayer(by_layer) => {
            let smallest = by_layer.iter().copied().filter(|&b| b > 0).min();
            format!(
                "{} to {} by layer",
                format_bytes(smallest.unwrap_or(0)),
                format_bytes(sizes.largest())
            )
        }
    }
}

/// The model without its experts resident (a store with the smallest budget): enough for the
/// routers and hidden states.
pub(crate) fn load_base(path: &Path) -> Result<LoadedModel> {
    let (config, sizes) = open::expert_sizes_on(path, &odmoe_engine::default_device()?)?;
    let options = LoadOptions {
        experts: ExpertMode::OnDemand(StoreConfig {
            budget_bytes: open::budget_floor(&config, &sizes),
            io_threads: 1,
            policy: PolicyKind::Lru,
        }),
        ..LoadOptions::default()
    };
    open::load(path, &options, &odmoe_engine::default_device()?)
        .with_context(|| format!("loading model from {}", path.display()))
}

fn record(args: RecordArgs) -> Result<()> {
    let path = &args.model.model;
    let tokenizer = open::load_tokenizer(path)?
        .with_context(|| format!("{} has no tokenizer to encode the prompts", path.display()))?;
    let prompts = read_prompts(&args.prompts)?
        .iter()
        .map(|p| tokenizer.encode(p, true).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let mut stop_ids = model.config.eos_token_ids.clone();
    stop_ids.extend_from_slice(tokenizer.eos_token_ids());
    let options = RecordOptions {
        max_tokens: args.max_tokens,
        hidden: args.hidden,
        stop_ids,
        expert_sizes: match &loaded.store {
            Some(store) => store.expert_sizes().clone(),
            None => expert_sizes(path)?,
        },
        model: path.display().to_string(),
    };
    let count = prompts.len();
    let mut progress = ProgressLines::on_stderr();
    let trace = Trace::record(model, &prompts, &options, |p| {
        progress.update(&format!("recorded {}/{count} prompts", p + 1));
    })?;
    progress.finish();
    save(&trace, &args.out, args.hidden_dtype)?;
    let forwards = trace.forwards();
    eprintln!(
        "{}: {} tokens ({} prompts, {} decode steps), {} layers, {} experts of {} each{}",
        args.out.display(),
        trace.num_tokens(),
        count,
        forwards.iter().filter(|(_, prefill)| !prefill).count(),
        trace.num_layers(),
        trace.num_experts(),
        describe_sizes(&trace.expert_sizes),
        if args.hidden {
            ", with hidden states"
        } else {
            ""
        }
    );
    Ok(())
}

/// Progress as one line: rewritten in place (`\r`) on a terminal, one line per update elsewhere,
/// so that a log or a pipe gets whole lines. A progress line that cannot be shown is no reason
/// to stop the work, so write errors are ignored.
struct ProgressLines<W: Write> {
    out: W,
    in_place: bool,
}

impl ProgressLines<std::io::Stderr> {
    fn on_stderr() -> Self {
        let out = std::io::stderr();
        let in_place = out.is_terminal();
        Self { out, in_place }
    }
}

impl<W: Write> ProgressLines<W> {
    fn update(&mut self, text: &str) {
        let _ = if self.in_place {
            write!(self.out, "\r{text}").and_then(|()| self.out.flush())
        } else {
            writeln!(self.out, "{text}")
        };
    }

    /// Ends the line that in-place updates leave open.
    fn finish(&mut self) {
        if self.in_place {
            let _ = writeln!(self.out);
        }
    }
}

/// How prefetching is tuned, shared by `trace replay` and `predictor bench`: the
/// predictor's weights go to [`predictor`], the rest to the prefetcher.
#[derive(Args)]
pub struct PrefetchTuning {
    /// Shadow predictor weights from `odmoe predictor train` (for the shadow predictor).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Keep prefetching even while it wastes more than it saves.
    #[arg(long)]
    pub no_adaptive: bool,
    /// Prefetch only guesses scoring at least this (a routing probability for lookahead, a
    /// sigmoid for shadow); 0 prefetches every top-k guess.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub min_score: f32,
}

/// The predictor a replay or an evaluation asks for.
pub(crate) fn predictor(
    kind: PredictorKind,
    trace: &Trace,
    depth: usize,
    model: Option<&Path>,
    weights: Option<&Path>,
) -> Result<Option<Box<dyn Predictor>>> {
    Ok(match kind {
        // The replay builds a routing history of its own, which learns along the trace.
        PredictorKind::None | PredictorKind::History => None,
        PredictorKind::Recorded => {
            bail!(
                "guesses from a recorded routing are for live runs (odmoe bench decode --prefetch-from-trace)"
            )
        }
        PredictorKind::Lookahead => {
            let model = model.context("the lookahead predictor needs --model (its routers)")?;
            let loaded = load_base(model)?;
            if loaded.model.config != trace.config {
                bail!(
                    "{} is not the model the trace was recorded from",
                    model.display()
                );
            }
            Some(Box::new(Lookahead::new(&loaded.model, depth)?))
        }
        PredictorKind::Shadow => {
            let weights =
                weights.context("the shadow predictor needs --weights (odmoe predictor train)")?;
            let shadow = Shadow::load(weights, &trace.config)?;
            if shadow.depth() < depth {
                bail!(
                    "{} predicts {} layers ahead, not {depth}",
                    weights.display(),
                    shadow.depth()
                );
            }
            Some(Box::new(shadow.truncated(depth)))
        }
    })
}

fn replay_command(args: ReplayArgs) -> Result<()> {
    let trace = Trace::load(&args.trace)?;
    let total = trace.total_expert_bytes();
    let budgets: Vec<(String, u64)> = if args.sweep.is_empty() {
        let text = args.budget.clone().unwrap_or_default();
        vec![(text.clone(), parse_budget(&text, total)?)]
    } else {
        args.sweep
            .iter()
            .map(|b| {
                let text = if b.trim().ends_with('%') || b.contains(|c: char| c.is_alphabetic()) {
                    b.trim().to_string()
                } else {
                    format!("{}%", b.trim())
                };
                Ok((text.clone(), parse_budget(&text, total)?))
            })
            .collect::<Result<_>>()?
    };
    let minimum = open::budget_floor(&trace.config, &trace.expert_sizes);
    let mut predictors: Vec<(PrefetchArg, Option<Box<dyn Predictor>>)> = Vec::new();
    for &p in &args.prefetch {
        let built = match p {
            PrefetchArg::Predictor(kind) => predictor(
                kind,
                &trace,
                args.depth,
                args.model.as_deref(),
                args.tuning.weights.as_deref(),
            )?,
            PrefetchArg::Oracle => None,
        };
        predictors.push((p, built));
    }
    let mut reports: Vec<(String, ReplayReport, f64)> = Vec::new();
    for (text, budget) in &budgets {
        let budget = (*budget).max(minimum);
        let belady = replay(
            &trace,
            &ReplayOptions::new(budget, ReplayPolicy::Belady, &trace),
            Prefetch::None,
        )?
        .hit_rate;
        for &policy in &args.policy {
            for (arg, built) in &predictors {
                let prefetch = match (arg, built) {
                    (PrefetchArg::Oracle, _) => Prefetch::Oracle,
                    (PrefetchArg::Predictor(PredictorKind::History), _) => Prefetch::History,
                    (_, Some(p)) => Prefetch::Predictor(p.as_ref()),
                    (_, None) => Prefetch::None,
                };
                let options = ReplayOptions {
                    depth: args.depth,
                    adaptive: !args.tuning.no_adaptive,
                    min_score: args.tuning.min_score,
                    disk_gbps: args.disk_gbps,
                    compute_ms: args.compute_ms,
                    ..ReplayOptions::new(budget, policy, &trace)
                };
                let report = replay(&trace, &options, prefetch)?;
                reports.push((text.clone(), report, belady));
            }
        }
    }
    if args.json {
        let out: Vec<_> = reports
            .iter()
            .map(|(text, r, belady)| {
                let mut v = serde_json::to_value(r).expect("reports serialise");
                v["budget"] = json!(text);
                v["belady_hit_rate"] = json!(belady);
                v["of_belady"] = if *belady > 0.0 {
                    json!(r.hit_rate / belady)
                } else {
                    serde_json::Value::Null
                };
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} tokens ({} decode), {} layers x {} experts of {}; stall model: {} GB/s, {} ms per layer-token",
        args.trace.display(),
        trace.num_tokens(),
        reports.first().map_or(0, |r| r.1.decode_tokens),
        trace.num_layers(),
        trace.num_experts(),
        describe_sizes(&trace.expert_sizes),
        args.disk_gbps,
        args.compute_ms
    )?;
    writeln!(
        out,
        "| budget | experts | policy | prefetch | hit rate | of Belady | read | prefetch issued/used/wasted/cancelled, hits cost | recall | stall ms | decode tok/s (model) |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (text, r, belady) in &reports {
        let recall: Vec<String> = r
            .recall
            .iter()
            .map(|x| x.map_or("-".into(), |x| format!("{:.2}", x)))
            .collect();
        writeln!(
            out,
            "| {text} | {} | {} | {}{} | {:.1}% | {} | {} | {}/{}/{}/{}, {} | {} | {:.1} | {:.1} |",
            r.budget_experts,
            r.policy,
            r.prefetch,
            if r.depth > 0 {
                format!(" d={}", r.depth)
            } else {
                String::new()
            },
            r.hit_rate * 100.0,
            if *belady > 0.0 {
                format!("{:.3}", r.hit_rate / belady)
            } else {
                "-".into()
            },
            format_bytes(r.bytes_read),
            r.prefetch_issued,
            r.prefetch_used,
            r.prefetch_wasted,
            r.prefetch_cancelled,
            r.prefetch_evicted_hits,
            if recall.is_empty() {
                "-".into()
            } else {
                recall.join(" ")
            },
            r.stall_ms,
            r.est_decode_tok_s,
        )?;
    }
    if let Some((_, r, _)) = reports.iter().find(|(_, r, _)| r.predict_p50_us > 0.0) {
        writeln!(
            out,
            "{} predictor latency per layer: p50 {:.0} us, p99 {:.0} us",
            r.prefetch, r.predict_p50_us, r.predict_p99_us
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Replay {
        #[command(flatten)]
        args: ReplayArgs,
    }

    #[test]
    fn replay_defaults_to_the_stores_policy_and_lists_every_policy() {
        let parsed =
            Replay::try_parse_from(["replay", "t.safetensors", "--budget", "25%"]).unwrap();
        assert_eq!(parsed.args.policy, [ReplayPolicy::Reuse]);
        let help = Replay::command().render_long_help().to_string();
        for policy in ReplayPolicy::ALL {
            assert!(
                help.contains(&policy.to_string()),
                "{policy} missing from\n{help}"
            );
        }
        assert!(help.contains("[default: reuse]"), "{help}");
    }

    #[test]
    fn an_expert_is_its_share_of_the_layers_with_experts() {
        // DeepSeek-V3's first layer is dense: its experts are spread over the other two.
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek_v3");
        let (config, _) = open::describe(&fixture).unwrap();
        assert!(config.moe_layers().count() < config.num_layers);
        assert_eq!(
            expert_sizes(&fixture).unwrap(),
            ExpertSizes::Same(config.expert_f32_bytes() as u64)
        );
    }

    #[test]
    fn progress_is_whole_lines_off_a_terminal_and_in_place_on_one() {
        let show = |in_place| {
            let mut progress = ProgressLines {
                out: Vec::new(),
                in_place,
            };
            progress.update("recorded 1/2 prompts");
            progress.update("recorded 2/2 prompts");
            progress.finish();
            String::from_utf8(progress.out).unwrap()
        };
        assert_eq!(show(false), "recorded 1/2 prompts\nrecorded 2/2 prompts\n");
        assert_eq!(show(true), "\rrecorded 1/2 prompts\rrecorded 2/2 prompts\n");
    }
}
