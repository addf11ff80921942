//! Helpers for the end-to-end tests: where the fixtures and the built binaries are.
//!
//! The binaries come from the same `cargo build`/`cargo test` of the workspace (`scripts/test.sh`
//! builds them first); a missing one is reported with the command that builds it.

use std::path::PathBuf;
use std::process::{Command, Output};

/// A committed fixture directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A workspace binary built beside this test executable (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs `odmoe` with `args`; panics (with stderr) if it fails or panics.
pub fn odmoe(args: &[&str]) -> Output {
    let output = Command::new(binary("odmoe"))
        .args(args)
        .output()
        .expect("spawn odmoe");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "odmoe panicked: {stderr}");
    output
}

/// Runs `odmoe` and returns stdout, asserting success.
pub fn odmoe_ok(args: &[&str]) -> String {
    let output = odmoe(args);
    assert!(
        output.status.success(),
        "odmoe {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 stdout")
}
