//! The API key: made on first start, kept in a file only its user can read.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use rand::RngCore;

/// What every key starts with, so a key found in a log or a shell history says what it is.
const PREFIX: &str = "odmoe-";

/// The key in `path`, made there first (mode 0600, written to a temporary name and renamed) when
/// the file does not exist. A key file others can read is refused: anyone could use the key.
pub fn load_or_create(path: &Path) -> anyhow::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mode = fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                bail!(
                    "the HTTP key file {} may be read by others (mode {:o}): run `chmod 600 {}`",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
            let key = text.trim();
            if key.is_empty() {
                bail!(
                    "the HTTP key file {} is empty: delete it to make a new key",
                    path.display()
                );
            }
            Ok(key.to_owned())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => create(path),
        Err(error) => {
            Err(error).with_context(|| format!("cannot read the HTTP key file {}", path.display()))
        }
    }
}

fn create(path: &Path) -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let key: String = std::iter::once(PREFIX.to_owned())
        .chain(bytes.iter().map(|byte| format!("{byte:02x}")))
        .collect();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot make the directory {}", dir.display()))?;
    }
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(format!("{key}\n").as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(error)
            .with_context(|| format!("cannot write the HTTP key file {}", path.display()));
    }
    Ok(key)
}

/// Whether `given` is `key`, in time that does not depend on where they differ.
pub fn matches(given: &str, key: &str) -> bool {
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config/http-key");
        let key = load_or_create(&path).unwrap();
        assert!(
            key.starts_with(PREFIX) && key.len() == PREFIX.len() + 48,
            "{key}"
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), key);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }

    #[test]
    fn keys_compare_whole() {
        assert!(matches("odmoe-ab", "odmoe-ab"));
        assert!(!matches("odmoe-a", "odmoe-ab"));
        assert!(!matches("odmoe-ac", "odmoe-ab"));
        assert!(!matches("", "odmoe-ab"));
    }
}
