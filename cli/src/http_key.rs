//! `odmoe http-key`: the key HTTP clients send to odmoed (`Authorization: Bearer KEY`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use odmoe_config::Config;

#[derive(Args)]
pub struct HttpKeyArgs {
    /// The daemon's config file, when it is not the default one (its `[http] key_file` says
    /// where the key is).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(args: HttpKeyArgs) -> Result<()> {
    let (config, _) = Config::load(args.config.as_deref())?;
    let path = config.http.key_path()?;
    let key = match std::fs::read_to_string(&path) {
        Ok(key) => key,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "no HTTP key at {}: odmoed makes it when it first starts with HTTP on \
             (`odmoed --http 127.0.0.1:11535` or `[http] listen`)",
            path.display()
        ),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", path.display()));
        }
    };
    println!("{}", key.trim());
    Ok(())
}
