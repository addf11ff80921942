//! The folder of models a user keeps (`model.models_dir`), as Ollama users
//! know it: `models` lists what is there and `load NAME` takes a name from it.

use std::path::{Path, PathBuf};

use odmoe_engine::open;

/// A model found in the folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The file or directory name, which `load` accepts in place of a path.
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
    /// "gguf", "odmoe" or "huggingface".
    pub format: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Its `model_type`; empty when it cannot be read.
    pub architecture: String,
    /// Decoder layers.
    pub layers: usize,
    /// Experts in each MoE layer; 0 for a dense model.
    pub experts_per_layer: usize,
    /// Experts routed per token; 0 for a dense model.
    pub experts_per_token: usize,
    /// Why the entry could not be read as a model, when it could not.
    pub error: Option<String>,
}

/// The models in `dir`, by name: every GGUF file, odmoe layout and Hugging
/// Face directory, with their shape; entries that are not models are left
/// out, and models that cannot be read are listed with the reason.
pub fn list(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let mut models = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        let Ok(format) = open::checkpoint_format(&path) else {
            continue;
        };
        let mut model = Entry {
            name,
            path: path.clone(),
            format: format.to_owned(),
            size_bytes: disk_bytes(&path),
            architecture: String::new(),
            layers: 0,
            experts_per_layer: 0,
            experts_per_token: 0,
            error: None,
        };
        match open::describe(&path) {
            Ok((config, _)) => {
                let dense = open::is_dense(&config);
                model.architecture =
                    odmoe_engine::model::model_type(config.architecture).to_owned();
                model.layers = config.num_layers;
                if !dense {
                    model.experts_per_layer = config.num_experts;
                    model.experts_per_token = config.num_experts_per_token;
                }
            }
            Err(error) => model.error = Some(error.to_string()),
        }
        models.push(model);
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

/// The model `name` in `dir`: the entry of that name, or of that name with
/// `.gguf` or `.odmoe` added. Names are single path components, so a name
/// cannot reach outside the folder.
pub fn resolve(dir: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    [
        name.to_owned(),
        format!("{name}.gguf"),
        format!("{name}.odmoe"),
    ]
    .into_iter()
    .map(|candidate| dir.join(candidate))
    .find(|path| path.exists())
}

/// Bytes a file or a directory's files take on disk, following no links.
fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| disk_bytes(&entry.path()))
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_inside_the_folder_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tiny.gguf"), b"GGUF").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        assert_eq!(
            resolve(dir.path(), "tiny"),
            Some(dir.path().join("tiny.gguf"))
        );
        assert_eq!(
            resolve(dir.path(), "tiny.gguf"),
            Some(dir.path().join("tiny.gguf"))
        );
        assert_eq!(resolve(dir.path(), "../etc/passwd"), None);
        assert_eq!(resolve(dir.path(), ".."), None);
        assert_eq!(resolve(dir.path(), "absent"), None);
        // A file that only looks like GGUF is listed with why it cannot load; other files not.
        let listed = list(dir.path()).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].name, "tiny.gguf");
        assert!(listed[0].error.is_some());
    }
}
