//! `odmoe models`: what the daemon has loaded and the models in its `models_dir`, which
//! `odmoe load NAME` takes by name.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use odmoe_protocol::ModelsResult;

use crate::daemon::{self, SocketArgs};
use odmoe_config::format_bytes;

#[derive(Args)]
pub struct ModelsArgs {
    /// Print the `models` method's result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

pub fn run(args: ModelsArgs) -> Result<()> {
    let runtime = daemon::runtime()?;
    let models: ModelsResult = runtime.block_on(async {
        let mut client = args.socket.connect().await?;
        client.models().await.map_err(daemon::explain)
    })?;
    let text = if args.json {
        serde_json::to_string_pretty(&models)? + "\n"
    } else {
        table(&models)
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

/// The models folder as a table, the loaded model marked.
fn table(models: &ModelsResult) -> String {
    let Some(dir) = &models.models_dir else {
        return "no models folder: set model.models_dir in odmoed.toml (`odmoe load PATH` \
                loads any model)\n"
            .to_owned();
    };
    if models.available.is_empty() {
        return format!("no models in {dir}\n");
    }
    let loaded: Vec<&str> = models.models.iter().map(|m| m.path.as_str()).collect();
    let mut rows = vec![[
        "NAME".to_owned(),
        "FORMAT".into(),
        "SIZE".into(),
        "ARCHITECTURE".into(),
        "EXPERTS".into(),
    ]];
    for model in &models.available {
        let mark = if loaded.contains(&model.path.as_str()) {
            " (loaded)"
        } else {
            ""
        };
        let experts = match (&model.error, model.experts_per_layer) {
            (Some(error), _) => format!("cannot read: {error}"),
            (None, 0) => "dense".to_owned(),
            (None, experts) => format!(
                "{} of {experts} x {} layers",
                model.experts_per_token, model.layers
            ),
        };
        rows.push([
            format!("{}{mark}", model.name),
            model.format.clone(),
            format_bytes(model.size_bytes),
            model.architecture.clone(),
            experts,
        ]);
    }
    crate::stats::aligned(&rows)
}

#[cfg(test)]
mod tests {
    use odmoe_protocol::AvailableModel;

    use super::*;

    #[test]
    fn the_table_names_each_model_and_marks_the_loaded_one() {
        let model = |name: &str, experts: u32| AvailableModel {
            name: name.into(),
            path: format!("/m/{name}"),
            format: "gguf".into(),
            size_bytes: 3 << 20,
            architecture: "qwen3_moe".into(),
            layers: 2,
            experts_per_layer: experts,
            experts_per_token: 2,
            error: None,
        };
        let result = ModelsResult {
            models: Vec::new(),
            models_dir: Some("/m".into()),
            available: vec![model("a.gguf", 8), model("b.gguf", 0)],
        };
        let shown = table(&result);
        assert!(shown.contains("2 of 8 x 2 layers"), "{shown}");
        assert!(shown.contains("dense"), "{shown}");
        assert!(shown.contains("3.0 MiB"), "{shown}");
        let none = ModelsResult {
            models_dir: None,
            ..result
        };
        assert!(table(&none).contains("model.models_dir"));
    }
}
