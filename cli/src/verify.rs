//! `odmoe verify`: re-hash every file of an odmoe layout against its manifest.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use odmoe_config::format_bytes;
use odmoe_engine::format::layout::verify;

#[derive(Args)]
pub struct VerifyArgs {
    /// The odmoe layout directory (MODEL.odmoe).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Print the report as JSON on stdout: {ok, files_checked, bytes_checked, problems}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    let bar = crate::convert::bytes_bar();
    let report = verify(&args.model, |p| {
        if bar.length() != Some(p.bytes_total) {
            bar.set_length(p.bytes_total);
        }
        bar.set_position(p.bytes_done);
        bar.set_message(format!(
            "{}/{} files  {}",
            p.files_done, p.files_total, p.file
        ));
    })
    .with_context(|| format!("verifying {}", args.model.display()))?;
    bar.finish_and_clear();
    if args.json {
        let json = serde_json::json!({
            "ok": report.is_ok(),
            "files_checked": report.files_checked,
            "bytes_checked": report.bytes_checked,
            "problems": report.problems,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for problem in &report.problems {
            println!("FAILED {problem}");
        }
    }
    if !report.is_ok() {
        bail!(
            "{}: {} of {} files failed verification",
            args.model.display(),
            report.problems.len(),
            report.files_checked
        );
    }
    if !args.json {
        println!(
            "ok: {} files, {} match the manifest",
            report.files_checked,
            format_bytes(report.bytes_checked)
        );
    }
    Ok(())
}
