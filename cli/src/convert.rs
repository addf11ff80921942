//! `odmoe convert`: a Hugging Face checkpoint or a GGUF file to the odmoe layout, with a progress
//! bar.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use odmoe_config::format_bytes;
use odmoe_engine::convert::{ConvertEvent, convert};
use odmoe_engine::format::layout::Manifest;

#[derive(Args)]
pub struct ConvertArgs {
    /// Hugging Face checkpoint directory (config.json with model.safetensors, or shards listed
    /// by model.safetensors.index.json), or a GGUF file, whose experts keep their quantized
    /// blocks as stored.
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// Output directory, by convention MODEL.odmoe. Re-running over an interrupted conversion of
    /// the same checkpoint finishes it; over a complete one it changes nothing.
    #[arg(value_name = "OUT")]
    out: PathBuf,
    /// Turn a dense Llama (GGUF file or Hugging Face directory) into an MoE first: partition each
    /// layer's feed-forward neurons into E experts of equal size. With --top-k E the result
    /// computes the dense model exactly.
    #[arg(long, value_name = "E", requires = "top_k")]
    split_experts: Option<usize>,
    /// Experts chosen per token for --split-experts.
    #[arg(long, value_name = "K", requires = "split_experts")]
    top_k: Option<usize>,
    /// Text to calibrate --split-experts on: neurons that matter on the same tokens become one
    /// expert, and the router learns which experts matter. Without it, neurons are grouped by
    /// their gate weights alone (much worse below K = E).
    #[arg(long, value_name = "FILE", requires = "split_experts")]
    calibration: Option<PathBuf>,
}

/// Test hook, not a user option: sleep this many milliseconds at every progress step, so that
/// end-to-end tests can interrupt the conversion of a tiny fixture part-way through.
const THROTTLE_ENV: &str = "ODMOE_CONVERT_THROTTLE_MS";

pub fn run(args: ConvertArgs) -> Result<()> {
    // Timed from here, so that the time reported includes splitting.
    let started = Instant::now();
    // The split model is written as a Hugging Face directory beside OUT, then laid out like any
    // other checkpoint; it is removed once the layout is complete.
    let split_dir = args.out.with_extension("split-src");
    let mut layout_src = args.src.clone();
    if let (Some(experts), Some(top_k)) = (args.split_experts, args.top_k) {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("splitting {bar:30} layer {pos}/{len}")
                .expect("valid template"),
        );
        let calibration = match &args.calibration {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            ),
            None => None,
        };
        odmoe_engine::convert::split::split_dense_llama(
            &args.src,
            &split_dir,
            experts,
            top_k,
            calibration.as_deref(),
            |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .with_context(|| format!("splitting {} into {experts} experts", args.src.display()))?;
        bar.finish_and_clear();
        layout_src = split_dir.clone();
    }
    let (manifest, counts) = convert_layout(&layout_src, &args.out).with_context(|| {
        format!(
            "converting {} into {}",
            args.src.display(),
            args.out.display()
        )
    })?;
    if args.split_experts.is_some() {
        std::fs::remove_dir_all(&split_dir)
            .with_context(|| format!("removing {}", split_dir.display()))?;
    }
    // Named as the user named them: the split model's directory is gone by now.
    println!(
        "converted {} -> {} in {:.1} s",
        args.src.display(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    print_summary(&manifest, &counts);
    Ok(())
}

/// What a conversion did, counted from its progress events.
#[derive(Default)]
struct Counts {
    written: usize,
    kept: usize,
    tensors: usize,
}

/// Lays out the checkpoint at `src` in `out`, with a progress bar.
fn convert_layout(src: &Path, out: &Path) -> Result<(Manifest, Counts)> {
    let throttle = std::env::var(THROTTLE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let bar = bytes_bar();
    let mut counts = Counts::default();
    let manifest = convert(src, out, |p| {
        if bar.length() != Some(p.bytes_total) {
            bar.set_length(p.bytes_total);
        }
        bar.set_position(p.bytes_done);
        bar.set_message(format!(
            "{}/{} tensors, {}/{} files  {}",
            p.tensors_done, p.tensors_total, p.files_done, p.files_total, p.file
        ));
        match p.event {
            ConvertEvent::Written => counts.written += 1,
            ConvertEvent::Kept => counts.kept += 1,
            ConvertEvent::Tensor | ConvertEvent::Rehash => {}
        }
        counts.tensors = p.tensors_done;
        if let Some(pause) = throttle
            && p.event != ConvertEvent::Rehash
        {
            std::thread::sleep(pause);
        }
    })?;
    bar.finish_and_clear();
    Ok((manifest, counts))
}

/// The layout's shape and sizes, after the line naming source and output.
fn print_summary(manifest: &Manifest, counts: &Counts) {
    let config = &manifest.architecture;
    let experts = config.moe_layers().count() * config.num_experts;
    let expert_bytes = experts as u64 * manifest.expert.file_bytes;
    let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
    println!(
        "  {}: {} layers x {} experts (top-{}), {} {} expert files of {}",
        odmoe_engine::model::model_type(config.architecture),
        config.num_layers,
        config.num_experts,
        config.num_experts_per_token,
        experts,
        manifest.expert.dtype,
        format_bytes(manifest.expert.file_bytes)
    );
    println!(
        "  {} files and the manifest, {} tensors, {}: experts {}, the rest {}",
        manifest.files.len(),
        counts.tensors,
        format_bytes(bytes),
        format_bytes(expert_bytes),
        format_bytes(bytes.saturating_sub(expert_bytes))
    );
    if counts.kept > 0 {
        println!(
            "  {} files written, {} kept from an earlier run",
            counts.written, counts.kept
        );
    }
}

/// A progress bar over bytes on stderr, hidden when stderr is not a terminal.
pub fn bytes_bar() -> ProgressBar {
    use std::io::IsTerminal;
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed:>4} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}) {wide_msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}
