//! How a detached daemon tells the process that started it whether it came up.
//!
//! The parent of a detached `odmoed` waits on a pipe until the child has
//! loaded its model (or has none to load) and is about to serve, or has
//! failed: the parent then exits 0, or 1 with the child's error on stderr, so
//! that `odmoed --model BROKEN` fails where the user can see it instead of
//! only in the log. A child that dies without a word closes the pipe, which
//! the parent reports too.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use odmoe_engine::lock::recover;

/// The write end of the pipe in a detached child; `None` in the foreground
/// and once reported.
static REPORT: Mutex<Option<File>> = Mutex::new(None);

/// The first line of a successful start-up report.
const READY: &str = "ready";

/// Keeps the pipe's write end, in the child.
pub fn report_to(pipe: OwnedFd) {
    *lock() = Some(File::from(pipe));
}

/// Tells the parent the daemon is serving. Later calls do nothing.
pub fn ready() {
    send(READY);
}

/// Tells the parent why the daemon did not start. Later calls do nothing.
pub fn failed(error: &str) {
    send(error);
}

fn send(message: &str) {
    if let Some(mut pipe) = lock().take() {
        // The parent may have gone (killed); nothing is lost, the log has it.
        let _ = pipe.write_all(message.as_bytes());
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<File>> {
    recover(REPORT.lock())
}

/// In the parent: waits for the child's report on `pipe`. `Ok` once the child
/// serves; otherwise the reason it did not start.
pub fn wait_for_child(pipe: OwnedFd, log: &std::path::Path) -> Result<(), String> {
    let mut report = String::new();
    // EOF comes when the child reports (it drops its end) or dies.
    let _ = File::from(pipe).read_to_string(&mut report);
    match report.as_str() {
        READY => Ok(()),
        "" => Err(format!(
            "odmoed exited during start-up without saying why; see {}",
            log.display()
        )),
        error => Err(error.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_hears_ready_an_error_or_silence() {
        let log = std::path::Path::new("/run/odmoed.log");
        let (read, write) = nix::unistd::pipe().unwrap();
        report_to(write);
        failed("cannot serve /m: does not exist");
        ready();
        assert_eq!(
            wait_for_child(read, log),
            Err("cannot serve /m: does not exist".into())
        );

        let (read, write) = nix::unistd::pipe().unwrap();
        report_to(write);
        ready();
        assert_eq!(wait_for_child(read, log), Ok(()));

        let (read, write) = nix::unistd::pipe().unwrap();
        drop(write);
        let silent = wait_for_child(read, log).unwrap_err();
        assert!(silent.contains("/run/odmoed.log"), "{silent}");
    }
}
