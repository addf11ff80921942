//! `odmoe predictor train|eval|bench`: train the shadow predictor from a trace, measure recall and
//! latency on held-out traces, and measure live decode with prefetch off and on in one run.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use odmoe_engine::generate::{GenerateRequest, Session};
use odmoe_engine::open;
use odmoe_engine::predict::shadow::{TrainOptions, train};
use odmoe_engine::predict::trace::Trace;
use odmoe_engine::predict::{
    Predictor, PredictorKind, PrefetchOptions, PrefetchStats, Prefetcher, recall_on_trace,
};
use serde_json::json;

#[derive(Subcommand)]
pub enum PredictorCommand {
    /// Train the shadow predictor (an MLP per target layer) from a trace recorded with --hidden.
    Train(TrainArgs),
    /// Recall@top-k by depth and latency per layer of a predictor on a (held-out) trace.
    Eval(EvalArgs),
    /// Decode tok/s, stall time and hit rate with prefetch off and on, measured in one run.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// Trace recorded with `odmoe trace record --hidden`.
    trace: PathBuf,
    /// Layers ahead to predict.
    #[arg(long, default_value_t = 4, value_name = "D")]
    depth: usize,
    /// Weights file to write (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[arg(long, default_value_t = 40, value_name = "N")]
    epochs: usize,
    /// Width of the hidden layer.
    #[arg(long, default_value_t = 256, value_name = "N")]
    units: usize,
    #[arg(long, default_value_t = 2e-3, value_name = "LR")]
    lr: f64,
    #[arg(long, default_value_t = 128, value_name = "N")]
    batch_size: usize,
    /// A held-out trace (other prompts) to report recall on after training.
    #[arg(long, value_name = "TRACE")]
    eval: Option<PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Trace to score on: with hidden states for lookahead and shadow (record held-out prompts,
    /// not the training ones); any trace, imported ones too, for history.
    trace: PathBuf,
    /// lookahead (needs --model), shadow (needs --weights), or history (learns the routing as it
    /// goes along the trace; a depth of the layer count reaches the next token's same layer).
    #[arg(long, value_name = "KIND")]
    predictor: PredictorKind,
    #[arg(long, default_value_t = 4, value_name = "D")]
    depth: usize,
    /// The model the trace was recorded from.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Shadow predictor weights.
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// Prompts, one per line (default: a few built-in sentences).
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Greedy tokens per prompt.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_tokens: usize,
    #[arg(long, default_value_t = 1, value_name = "D")]
    depth: usize,
    /// Predictors to compare with no prefetch (comma separated).
    #[arg(
        long,
        default_value = "lookahead",
        value_delimiter = ',',
        value_name = "KIND"
    )]
    prefetch: Vec<PredictorKind>,
    #[command(flatten)]
    tuning: crate::trace::PrefetchTuning,
    /// Runs of each mode, interleaved so that drift hits all alike.
    #[arg(long, default_value_t = 3, value_name = "N")]
    rounds: usize,
    #[arg(long)]
    json: bool,
}

const DEFAULT_PROMPTS: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small village by the sea.",
    "Mixture of experts models route each token to a few experts.",
    "The museum opens at nine and closes at five on weekdays.",
];

pub fn run(command: PredictorCommand) -> Result<()> {
    match command {
        PredictorCommand::Train(args) => train_command(args),
        PredictorCommand::Eval(args) => eval(args),
        PredictorCommand::Bench(args) => bench(args),
    }
}

fn train_command(args: TrainArgs) -> Result<()> {
    let trace = Trace::load(&args.trace)?;
    if trace.hidden.is_none() {
        bail!(
            "{} has no hidden states: record it with --hidden",
            args.trace.display()
        );
    }
    let options = TrainOptions {
        depth: args.depth,
        units: args.units,
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        ..TrainOptions::default()
    };
    let started = Instant::now();
    let epochs = args.epochs;
    let shadow = train(&trace, &options, &mut |layer, epoch, loss| {
        if epoch == 1 || epoch == epochs {
            eprintln!("layer {layer} epoch {epoch}/{epochs}: loss {loss:.4}");
        }
    })?;
    let partial = args.out.with_extension("safetensors.partial");
    shadow
        .save(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("renaming {} to {}", partial.display(), args.out.display()))?;
    eprintln!(
        "{}: depth {}, trained on {} tokens in {:.1} s",
        args.out.display(),
        args.depth,
        trace.num_tokens(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.eval {
        let held_out = Trace::load(path)?;
        let recall = recall_on_trace(&shadow, &held_out)?;
        println!(
            "recall@{} on {}: {}",
            trace.top_k(),
            path.display(),
            fmt_recall(&recall)
        );
    }
    Ok(())
}

fn fmt_recall(recall: &[f64]) -> String {
    recall
        .iter()
        .enumerate()
        .map(|(i, r)| format!("d{}={r:.3}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// p50 and p99 of one prediction per layer for single tokens (as in decode), in microseconds.
fn latency(predictor: &dyn Predictor, trace: &Trace, samples: usize) -> Result<(f64, f64)> {
    let (n, l) = (trace.num_tokens(), trace.num_layers());
    let mut times = Vec::new();
    let stride = (n * l / samples.max(1)).max(1);
    for step in (0..n * l).step_by(stride) {
        let (t, layer) = (step / l, step % l);
        let hidden = trace.hidden_rows(t..t + 1, layer)?;
        let started = Instant::now();
        std::hint::black_box(predictor.predict(layer, &hidden)?);
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let at = |p: f64| {
        times[((p / 100.0 * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1]
    };
    Ok((at(50.0), at(99.0)))
}

fn eval(args: EvalArgs) -> Result<()> {
    let trace = Trace::load(&args.trace)?;
    let (recall, p50, p99) = if args.predictor == PredictorKind::History {
        let eval = odmoe_engine::predict::history::evaluate(&trace, args.depth)?;
        (eval.recall, eval.p50_us, eval.p99_us)
    } else {
        let predictor = crate::trace::predictor(
            args.predictor,
            &trace,
            args.depth,
            args.model.as_deref(),
            args.weights.as_deref(),
        )?
        .context("choose a predictor to evaluate: lookahead, shadow or history")?;
        let recall = recall_on_trace(predictor.as_ref(), &trace)?;
        let (p50, p99) = latency(predictor.as_ref(), &trace, 2000)?;
        (recall, p50, p99)
    };
    let chance = trace.top_k() as f64 / trace.num_experts() as f64;
    if args.json {
        println!(
            "{}",
            json!({
                "predictor": args.predictor, "depth": args.depth, "top_k": trace.top_k(),
                "recall": recall, "chance": chance, "tokens": trace.num_tokens(),
                "latency_p50_us": p50, "latency_p99_us": p99,
            })
        );
    } else {
        println!(
            "{} on {} ({} tokens): recall@{} {} (chance {chance:.3}); latency per layer p50 {p50:.0} us, p99 {p99:.0} us",
            args.predictor,
            args.trace.display(),
            trace.num_tokens(),
            trace.top_k(),
            fmt_recall(&recall)
        );
    }
    Ok(())
}

#[derive(Default)]
struct ModeTotals {
    tokens: usize,
    decode_s: f64,
    hits: u64,
    misses: u64,
    stall_us: u64,
    prefetch: Option<PrefetchStats>,
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.model.expert_budget.is_none() {
        bail!("give --expert-budget: prefetch matters only when experts are read on demand");
    }
    let path = args.model.model.clone();
    let tokenizer = open::load_tokenizer(&path)?
        .with_context(|| format!("{} has no tokenizer", path.display()))?;
    let texts = match &args.prompts {
        Some(file) => crate::trace::read_prompts(file)?,
        None => DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    let prompts = texts
        .iter()
        .map(|t| tokenizer.encode(t, true).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let mut modes = vec![PredictorKind::None];
    modes.extend(args.prefetch.iter().filter(|k| **k != PredictorKind::None));
    let mut totals: Vec<ModeTotals> = modes.iter().map(|_| ModeTotals::default()).collect();
    for _ in 0..args.rounds.max(1) {
        for (mode, total) in modes.iter().zip(totals.iter_mut()) {
            let mut loaded = args.model.load_with(PredictorKind::None, 1)?;
            let store = loaded
                .store
                .clone()
                .context("an on-demand load has a store")?;
            let prefetcher = match odmoe_engine::predict::build(
                *mode,
                &loaded.model,
                args.depth,
                args.tuning.weights.as_deref(),
            )? {
                Some(predictor) => {
                    let options = PrefetchOptions {
                        adaptive: !args.tuning.no_adaptive,
                        min_score: args.tuning.min_score,
                        ..PrefetchOptions::new(args.depth, loaded.model.config.num_layers)
                    };
                    Some(Prefetcher::install(
                        &mut loaded.model,
                        predictor,
                        store.clone(),
                        options,
                    ))
                }
                None => None,
            };
            let model = &loaded.model;
            for prompt in &prompts {
                let request = GenerateRequest {
                    prompt: prompt.clone(),
                    max_tokens: args.max_tokens,
                    ignore_eos: true,
                    ..Default::default()
                };
                let out = Session::new(model).generate(model, None, &request, |_| true)?;
                total.tokens += out.tokens.len();
                total.decode_s += out.timings.decode_ms / 1e3;
            }
            store.wait_idle();
            let stats = store.stats();
            total.hits += stats.hits;
            total.misses += stats.misses;
            total.stall_us += stats.stall_us;
            if let Some(p) = prefetcher {
                let s = p.stats();
                total.prefetch = Some(match total.prefetch.take() {
                    None => s,
                    Some(mut acc) => {
                        acc.issued += s.issued;
                        acc.used += s.used;
                        acc.wasted += s.wasted;
                        acc.dropped += s.dropped;
                        acc.switched_off += s.switched_off;
                        acc.predictions += s.predictions;
                        acc.steps += s.steps;
                        acc.predict_p50_us = acc.predict_p50_us.max(s.predict_p50_us);
                        acc.predict_p99_us = acc.predict_p99_us.max(s.predict_p99_us);
                        acc.recall = s.recall;
                        acc
                    }
                });
            }
        }
    }
    let base = totals[0].tokens as f64 / totals[0].decode_s.max(1e-9);
    let rows: Vec<serde_json::Value> = modes
        .iter()
        .zip(&totals)
        .map(|(mode, t)| {
            let tok_s = t.tokens as f64 / t.decode_s.max(1e-9);
            let p = t.prefetch.clone().unwrap_or_default();
            json!({
                "prefetch": mode, "depth": if *mode == PredictorKind::None { 0 } else { args.depth },
                "tokens": t.tokens, "tok_s": tok_s, "vs_none": tok_s / base,
                "hit_rate": t.hits as f64 / (t.hits + t.misses).max(1) as f64,
                "stall_ms": t.stall_us as f64 / 1e3,
                "issued": p.issued, "used": p.used, "wasted": p.wasted, "dropped": p.dropped,
                "cancelled": p.cancelled, "evicted_hits": p.evicted_hits,
                "switched_off": p.switched_off, "predictions": p.predictions, "steps": p.steps,
                "recall": p.recall, "predict_p50_us": p.predict_p50_us, "predict_p99_us": p.predict_p99_us,
            })
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} at expert budget {}, {} prompts x {} tokens, {} rounds",
        path.display(),
        args.model.expert_budget.as_deref().unwrap_or(""),
        prompts.len(),
        args.max_tokens,
        args.rounds
    )?;
    writeln!(
        out,
        "| prefetch | decode tok/s | vs none | hit rate | stall ms | issued/used/wasted/cancelled, hits cost | predicted layers | recall | predict p50/p99 us |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        let recall: Vec<String> = r["recall"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_f64().map_or("-".into(), |x| format!("{x:.2}")))
                    .collect()
            })
            .unwrap_or_default();
        writeln!(
            out,
            "| {}{} | {:.1} | {:.2}x | {:.1}% | {:.1} | {}/{}/{}/{}, {} | {}/{} | {} | {:.0}/{:.0} |",
            r["prefetch"].as_str().unwrap_or(""),
            match r["depth"].as_u64() {
                Some(0) | None => String::new(),
                Some(d) => format!(" d={d}"),
            },
            r["tok_s"].as_f64().unwrap_or(0.0),
            r["vs_none"].as_f64().unwrap_or(0.0),
            r["hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
            r["stall_ms"].as_f64().unwrap_or(0.0),
            r["issued"],
            r["used"],
            r["wasted"],
            r["cancelled"],
            r["evicted_hits"],
            r["predictions"],
            r["steps"],
            if recall.is_empty() {
                "-".into()
            } else {
                recall.join(" ")
            },
            r["predict_p50_us"].as_f64().unwrap_or(0.0),
            r["predict_p99_us"].as_f64().unwrap_or(0.0),
        )?;
    }
    Ok(())
}
