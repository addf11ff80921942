//! `odmoe bench decode`: one engine's run of the comparison benchmark (`bench/compare.py`).
//!
//! Prefills a prompt of token ids, then decodes, feeding either given token ids (so routing varies
//! as in real text, identically for every engine) or the greedy choice. It prints the time to
//! first token, decode speed, bytes read from disk (and the least its misses needed), peak resident
//! memory and the store's hit rate next to Belady's (the offline optimum) on the same routing.
//!
//! With `--prefetch-from-trace` it prefetches from a recording of the same run's routing instead
//! of a predictor: every guess right, the most prediction could gain on the machine.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use odmoe_engine::model::{ForwardTrace, Logits, layers::argmax};
use odmoe_engine::predict::recorded::RecordedRouting;
use odmoe_engine::predict::replay::{Prefetch, ReplayOptions, ReplayPolicy, replay};
use odmoe_engine::predict::trace::Trace;
use odmoe_engine::predict::{PredictorKind, PrefetchOptions, Prefetcher, RoutingSource};
use odmoe_engine::store::ExpertSizes;
use serde_json::json;

use crate::model_args::ModelArgs;

#[derive(Args)]
pub struct DecodeBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma separated, or `@FILE` to read them from a file (a long prompt's
    /// ids exceed what one command-line argument may hold).
    #[arg(long, required = true, value_name = "IDS|@FILE", value_parser = crate::parse_token_list)]
    prompt_ids: crate::TokenList,
    /// Decode steps.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Token ids fed during decode instead of the greedy choice (at least --tokens of them).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    feed_ids: Option<Vec<u32>>,
    /// Save the run's routing (prompt and decode) as a trace, to replay other policies on the
    /// very routing this run saw (`odmoe trace replay FILE`).
    #[arg(long, value_name = "FILE")]
    trace_out: Option<std::path::PathBuf>,
    /// Prefetch from a recording of this very run's routing instead of a predictor: the
    /// --trace-out of an earlier run with the same model, --prompt-ids and --feed-ids. Every
    /// guess is right, so the run shows the most any predictor could gain on this machine. It
    /// stays on (no gate), and the run fails if its routing is not the recording's.
    #[arg(
        long,
        value_name = "TRACE",
        conflicts_with = "prefetch_experts",
        requires = "expert_budget"
    )]
    prefetch_from_trace: Option<std::path::PathBuf>,
    /// Routed layers ahead to prefetch: the predictor's guesses (--prefetch-experts) or the
    /// recording's (--prefetch-from-trace).
    #[arg(long, default_value_t = 1, value_name = "D")]
    prefetch_depth: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Where `run`'s routing first departs from `recording`'s, as (token, layer); None when the
/// recording holds the whole run, forward pass by forward pass.
fn first_difference(recording: &Trace, run: &Trace) -> Option<(usize, usize)> {
    let step = run.num_layers() * run.top_k();
    (0..run.num_tokens())
        .find(|&t| {
            recording.forward.get(t) != run.forward.get(t)
                || recording.ids.get(t * step..(t + 1) * step)
                    != run.ids.get(t * step..(t + 1) * step)
        })
        .map(|t| {
            let layer = (0..run.num_layers())
                .find(|&l| t >= recording.num_tokens() || recording.ids(t, l) != run.ids(t, l))
                .unwrap_or(0);
            (t, layer)
        })
}

/// Bytes this process has read from storage, and its peak resident set.
fn process_io() -> Result<(u64, u64)> {
    let field = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let io = std::fs::read_to_string("/proc/self/io").context("reading /proc/self/io")?;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let read = field(&io, "read_bytes:").context("no read_bytes in /proc/self/io")?;
    let peak_kib = field(&status, "VmHWM:").context("no VmHWM in /proc/self/status")?;
    Ok((read, peak_kib * 1024))
}

pub fn run(args: DecodeBenchArgs) -> Result<()> {
    if let Some(feed) = &args.feed_ids
        && feed.len() < args.tokens
    {
        bail!(
            "--feed-ids has {} ids, fewer than --tokens {}",
            feed.len(),
            args.tokens
        );
    }
    let started = Instant::now();
    let predictor = match &args.prefetch_from_trace {
        Some(_) => PredictorKind::None,
        None => args.model.prefetch_experts,
    };
    let mut loaded = args.model.load_with(predictor, args.prefetch_depth)?;
    let load_s = started.elapsed().as_secs_f64();
    let recording = match &args.prefetch_from_trace {
        Some(path) => {
            let recording = Trace::load(path)
                .with_context(|| format!("reading the recorded routing {}", path.display()))?;
            let source =
                RecordedRouting::new(recording.clone(), &loaded.model.config, args.prefetch_depth)?;
            let store = loaded
                .store
                .clone()
                .context("an on-demand load has a store")?;
            let options = PrefetchOptions {
                adaptive: false,
                ..PrefetchOptions::new(args.prefetch_depth, loaded.model.config.num_layers)
            };
            loaded.prefetcher = Some(Prefetcher::install(
                &mut loaded.model,
                RoutingSource::Recorded(source),
                store,
                options,
            ));
            Some((path, recording))
        }
        None => None,
    };
    let model = &loaded.model;
    let (read_at_start, _) = process_io()?;

    let mut trace = Trace::new(
        model.config.clone(),
        loaded
            .store
            .as_ref()
            .map_or(ExpertSizes::Same(0), |s| s.expert_sizes().clone()),
        args.model.model.display().to_string(),
    );
    let mut cache = model.new_cache();
    cache.reserve(args.prompt_ids.0.len() + args.tokens);
    // The prompt in slabs, as a session runs it.
    let mut forward = |tokens: &[u32], trace: &mut Trace| -> Result<u32> {
        let mut last = None;
        for slab in tokens.chunks(model.prefill_slab()) {
            let mut seen = ForwardTrace::routing_only();
            last = Some(model.forward(slab, &mut cache, Logits::Last, Some(&mut seen))?);
            trace.push_forward(&seen, slab.len(), 0)?;
        }
        let logits = last.context("no tokens to run")?;
        Ok(argmax(&logits.squeeze(0)?.to_vec1::<f32>()?) as u32)
    };

    let prefill_started = Instant::now();
    let mut next = forward(&args.prompt_ids.0, &mut trace)?;
    let ttft_s = prefill_started.elapsed().as_secs_f64();
    let (read_after_prefill, _) = process_io()?;
    let store_after_prefill = loaded.store.as_ref().map(|s| s.stats());
    let decode_started = Instant::now();
    let mut generated = Vec::with_capacity(args.tokens);
    for step in 0..args.tokens {
        let token = match &args.feed_ids {
            Some(feed) => feed[step],
            None => next,
        };
        generated.push(token);
        next = forward(&[token], &mut trace)?;
    }
    let decode_s = decode_started.elapsed().as_secs_f64();
    let (read_at_end, peak_rss) = process_io()?;

    let store = loaded.store.as_ref().map(|s| {
        s.wait_idle();
        s.stats()
    });
    if let Some(path) = &args.trace_out {
        trace.save(path, candle_core::DType::F16)?;
    }
    if let Some((path, recording)) = &recording
        && let Some((token, layer)) = first_difference(recording, &trace)
    {
        bail!(
            "the routing recorded in {} is not this run's (they differ from token {token}, layer \
             {layer}), so its guesses were not all right: record it with --trace-out from a run \
             of the same model, --prompt-ids, --feed-ids and --tokens",
            path.display()
        );
    }
    let belady = match &store {
        Some(stats) => {
            let options = ReplayOptions::new(stats.budget_bytes, ReplayPolicy::Belady, &trace);
            Some(replay(&trace, &options, Prefetch::None)?)
        }
        None => None,
    };
    // Prefetched experts count as hits in the store; an access that cost no read at all is what
    // compares with Belady's hit rate (Belady prefetches nothing). Where layers' experts differ
    // in size, bytes count as experts of the mean size.
    let expert_bytes = trace.mean_expert_bytes().max(1);
    let rates = store.as_ref().map(|s| {
        let accesses = (s.hits + s.misses).max(1);
        let experts_read = s.bytes_read / expert_bytes;
        (
            s.hits as f64 / accesses as f64,
            1.0 - experts_read as f64 / accesses as f64,
        )
    });
    let decode_misses = match (&store, &store_after_prefill) {
        (Some(end), Some(start)) => Some(end.misses - start.misses),
        _ => None,
    };
    let decode_read = read_at_end - read_after_prefill;
    let per_token = |bytes: u64| bytes as f64 / args.tokens.max(1) as f64;
    let report = json!({
        "engine": "odmoe",
        "model": args.model.model.display().to_string(),
        "load_s": load_s,
        "prompt_tokens": args.prompt_ids.0.len(),
        "ttft_s": ttft_s,
        "decode_tokens": args.tokens,
        "decode_s": decode_s,
        "decode_tok_s": args.tokens as f64 / decode_s,
        "bytes_read": read_at_end - read_at_start,
        "decode_bytes_read_per_token": per_token(decode_read),
        "decode_miss_bytes_per_token": decode_misses.map(|m| per_token(m * expert_bytes)),
        "peak_rss_bytes": peak_rss,
        "hit_rate": rates.map(|r| r.0),
        "read_free_rate": rates.map(|r| r.1),
        "belady_hit_rate": belady.as_ref().map(|b| b.hit_rate),
        "belady_bytes_read": belady.as_ref().map(|b| b.bytes_read),
        "store": store,
        "prefetch": loaded.prefetcher.as_ref().map(|p| p.stats()),
        "generated": generated,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
