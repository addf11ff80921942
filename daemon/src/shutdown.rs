//! Telling connection handlers that the daemon is shutting down.

use tokio::sync::broadcast;

/// Listens for the server's shutdown announcement.
///
/// The server holds the `broadcast::Sender`; dropping it announces shutdown
/// to every handler at once. Once seen, the announcement is remembered, so
/// [`Shutdown::recv`] returns immediately after.
#[derive(Debug)]
pub struct Shutdown {
    /// Whether the announcement has been received.
    is_shutdown: bool,
    /// Closed (or sent to) when the server shuts down.
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    /// A listener on `notify`.
    pub fn new(notify: broadcast::Receiver<()>) -> Shutdown {
        Shutdown {
            is_shutdown: false,
            notify,
        }
    }

    /// Waits for the announcement, or returns at once if it was already seen.
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // Either a value or a closed channel means shutdown.
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}
