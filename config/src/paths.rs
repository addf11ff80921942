//! Where the config file and the socket live on each platform.
//!
//! | | Linux and other Unix | macOS |
//! |---|---|---|
//! | config | `$XDG_CONFIG_HOME/odmoe/odmoed.toml`, else `~/.config/odmoe/odmoed.toml` | `~/Library/Application Support/odmoe/odmoed.toml` |
//! | socket | `$XDG_RUNTIME_DIR/odmoe/odmoed.sock`, else `/tmp/odmoe-$UID/odmoed.sock` | `$TMPDIR/odmoe/odmoed.sock`, else `/tmp/odmoe-$UID/odmoed.sock` |
//!
//! The functions taking an `env` lookup are the rules themselves, testable
//! without touching the process environment; the others apply them to it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::ConfigError;

/// Directory under the platform's config and runtime directories.
const APP_DIR: &str = "odmoe";
/// File name of the config file.
const CONFIG_FILE: &str = "odmoed.toml";
/// File name of the socket.
const SOCKET_FILE: &str = "odmoed.sock";
/// File name of the HTTP API key, beside the config file.
const HTTP_KEY_FILE: &str = "http-key";

/// The default config file path for this user.
pub fn default_config_path() -> Result<PathBuf, ConfigError> {
    config_path_from(|name| std::env::var_os(name))
}

/// The default HTTP API key file for this user: `http-key` beside the config file.
pub fn default_http_key_path() -> Result<PathBuf, ConfigError> {
    Ok(default_config_path()?.with_file_name(HTTP_KEY_FILE))
}

/// The default socket path for this user.
pub fn default_socket_path() -> PathBuf {
    socket_path_from(
        |name| std::env::var_os(name),
        nix::unistd::getuid().as_raw(),
    )
}

/// An absolute directory from the environment variable `name`; relative or
/// empty values are ignored, as the XDG base directory spec asks.
fn absolute_dir(env: &impl Fn(&str) -> Option<OsString>, name: &str) -> Option<PathBuf> {
    env(name)
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
}

/// The user's home directory from `$HOME`.
pub(crate) fn home_from(env: &impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, ConfigError> {
    absolute_dir(env, "HOME").ok_or(ConfigError::NoHome)
}

/// [`default_config_path`] with the environment given by `env`.
pub fn config_path_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, ConfigError> {
    let base = if cfg!(target_os = "macos") {
        home_from(&env)?.join("Library/Application Support")
    } else {
        match absolute_dir(&env, "XDG_CONFIG_HOME") {
            Some(dir) => dir,
            None => home_from(&env)?.join(".config"),
        }
    };
    Ok(base.join(APP_DIR).join(CONFIG_FILE))
}

/// [`default_socket_path`] with the environment given by `env` and user `uid`.
pub fn socket_path_from(env: impl Fn(&str) -> Option<OsString>, uid: u32) -> PathBuf {
    let runtime = if cfg!(target_os = "macos") {
        // Per-user and private on macOS (/var/folders/...).
        "TMPDIR"
    } else {
        "XDG_RUNTIME_DIR"
    };
    let dir = match absolute_dir(&env, runtime) {
        Some(dir) => dir.join(APP_DIR),
        None => Path::new("/tmp").join(format!("{APP_DIR}-{uid}")),
    };
    dir.join(SOCKET_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| OsString::from(value))
        }
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn config_path_follows_xdg() {
        let vars = [("HOME", "/home/ada"), ("XDG_CONFIG_HOME", "/cfg")];
        assert_eq!(
            config_path_from(env(&vars)).unwrap(),
            Path::new("/cfg/odmoe/odmoed.toml")
        );
        let vars = [("HOME", "/home/ada"), ("XDG_CONFIG_HOME", "relative")];
        assert_eq!(
            config_path_from(env(&vars)).unwrap(),
            Path::new("/home/ada/.config/odmoe/odmoed.toml")
        );
        assert!(matches!(
            config_path_from(env(&[])),
            Err(ConfigError::NoHome)
        ));
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn socket_path_follows_xdg_runtime_dir() {
        let vars = [("XDG_RUNTIME_DIR", "/run/user/1000")];
        assert_eq!(
            socket_path_from(env(&vars), 1000),
            Path::new("/run/user/1000/odmoe/odmoed.sock")
        );
        assert_eq!(
            socket_path_from(env(&[("XDG_RUNTIME_DIR", "")]), 1000),
            Path::new("/tmp/odmoe-1000/odmoed.sock")
        );
    }

    #[cfg(target_os = "macos")]
    #[test]
    fn macos_paths() {
        let vars = [("HOME", "/Users/ada"), ("TMPDIR", "/var/folders/xy/T/")];
        assert_eq!(
            config_path_from(env(&vars)).unwrap(),
            Path::new("/Users/ada/Library/Application Support/odmoe/odmoed.toml")
        );
        assert_eq!(
            socket_path_from(env(&vars), 501),
            Path::new("/var/folders/xy/T/odmoe/odmoed.sock")
        );
        assert_eq!(
            socket_path_from(env(&[]), 501),
            Path::new("/tmp/odmoe-501/odmoed.sock")
        );
    }
}
