//! Finding the daemon's socket and connecting to it: only to a daemon run by
//! this user.

use std::io;
use std::path::{Path, PathBuf};

use odmoe_config::Config;
use tokio::net::UnixStream;

use crate::ClientError;

/// Connects to the socket at `path`, refusing a listener run by another user
/// before anything is sent.
pub(crate) async fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| connect_error(path, source))?;
    ensure_same_user(&stream, path)?;
    Ok(stream)
}

/// The socket the daemon listens on, by the user's config file.
pub fn default_socket() -> Result<PathBuf, ClientError> {
    Ok(Config::load(None)?.0.socket_path())
}

/// The error for a failed connection to `path`.
fn connect_error(path: &Path, source: io::Error) -> ClientError {
    let path = path.to_owned();
    match source.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning { path },
        io::ErrorKind::ConnectionRefused => ClientError::Refused { path },
        _ => ClientError::Connect { path, source },
    }
}

/// Refuses the connection, before anything is sent on it, unless the process
/// that listens on it (as the kernel reports) runs as this process's effective
/// user: the prompts are for the user's own daemon only.
fn ensure_same_user(stream: &UnixStream, path: &Path) -> Result<(), ClientError> {
    let daemon_uid = stream
        .peer_cred()
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?
        .uid();
    let client_uid = nix::unistd::geteuid().as_raw();
    if daemon_uid != client_uid {
        return Err(ClientError::OtherUser {
            path: path.to_owned(),
            daemon_uid,
            client_uid,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{Client, ClientError};

    #[tokio::test]
    async fn a_missing_socket_asks_whether_the_daemon_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odmoed.sock");
        let error = Client::connect(&path).await.unwrap_err();
        assert!(matches!(error, ClientError::NotRunning { .. }), "{error}");
        let shown = error.to_string();
        assert!(shown.starts_with("is odmoed running?"), "{shown}");
        assert!(shown.contains(&path.display().to_string()), "{shown}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odmoed.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let error = Client::connect(&path).await.unwrap_err();
        assert!(matches!(error, ClientError::Refused { .. }), "{error}");
    }
}
