//! The accept loop, the connection cap and graceful shutdown.
//!
//! [`run`] accepts clients on a bound socket (see [`crate::socket`]) until a
//! signal or a `shutdown` request, then stops accepting, removes the socket
//! file, cancels the generations in flight and waits (for a grace period) for
//! every handler to write its last answers.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tracing::{error, info, warn};

use crate::connection::{self, Admission, busy};
use crate::shutdown::Shutdown;
use crate::socket::BoundSocket;
use crate::state::State;

/// The accept loop's state.
struct Listener {
    /// The socket clients connect to.
    listener: UnixListener,
    /// The clients served at once (`max_connections`): a connection takes a
    /// permit with its first complete message.
    limit_connections: Arc<Semaphore>,
    /// Connections still waiting for their first message; bounded so that
    /// stalled connections cannot take every file descriptor.
    limit_pending: Arc<Semaphore>,
    /// Tells silent pending connections to make way for a new one.
    room_wanted: Arc<AtomicBool>,
    /// Dropped to tell every handler to finish.
    notify_shutdown: broadcast::Sender<()>,
    /// Cloned into every handler; when all clones are gone, all handlers are done.
    shutdown_complete: mpsc::Sender<()>,
    /// Shared with every handler.
    state: Arc<State>,
}

/// Shortest and longest pause after a failed accept.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Connections that may wait for their first message, per client served.
const PENDING_PER_CONNECTION: usize = 8;

/// How long a new connection waits for silent ones to make way: a little
/// more than the pause between two looks a connection takes at its timers.
const MAKE_WAY: Duration = Duration::from_millis(1500);

/// How long a graceful shutdown waits for connections to finish their answers.
const GRACE: Duration = Duration::from_secs(10);

/// Serves clients on `socket` until `signal` completes or a client calls
/// `shutdown`, then stops gracefully: in-flight generations are cancelled and
/// answered "cancelled". Must run inside a tokio runtime.
pub async fn run(
    socket: BoundSocket,
    state: Arc<State>,
    max_connections: usize,
    signal: impl Future<Output = &'static str>,
) -> io::Result<()> {
    let (listener, file) = socket.into_parts();
    listener.set_nonblocking(true)?;
    let (notify_shutdown, _) = broadcast::channel(1);
    let (shutdown_complete, mut all_done) = mpsc::channel::<()>(1);
    let mut server = Listener {
        listener: UnixListener::from_std(listener)?,
        limit_connections: Arc::new(Semaphore::new(max_connections)),
        limit_pending: Arc::new(Semaphore::new(max_connections * PENDING_PER_CONNECTION)),
        room_wanted: Arc::new(AtomicBool::new(false)),
        notify_shutdown,
        shutdown_complete,
        state: Arc::clone(&state),
    };
    match &file {
        Some(file) => info!(socket = %file.path().display(), pid = std::process::id(), "listening"),
        None => info!(
            pid = std::process::id(),
            "listening on the socket of the service manager"
        ),
    }

    tokio::select! {
        () = server.accept_loop() => {}
        name = signal => info!(signal = name, "shutting down"),
        () = state.shutdown_requested() => info!("shutting down on request"),
    }
    // The HTTP listener stops with the socket's.
    state.request_shutdown();

    // Stop accepting and remove the socket, so new clients learn at once that
    // the daemon is gone; cancel the generations, then let the handlers write
    // their last answers.
    let Listener {
        listener,
        notify_shutdown,
        shutdown_complete,
        ..
    } = server;
    drop(listener);
    drop(file);
    state.scheduler.stop();
    drop(notify_shutdown);
    drop(shutdown_complete);
    if tokio::time::timeout(GRACE, all_done.recv()).await.is_err() {
        warn!(grace = ?GRACE, "connections still busy after the grace period; leaving them");
    }
    let scheduler_stopped = tokio::task::spawn_blocking(move || state.scheduler.join(GRACE)).await;
    if !matches!(scheduler_stopped, Ok(true)) {
        warn!("the engine is still busy after the grace period; leaving it");
    }
    info!("stopped");
    Ok(())
}

impl Listener {
    /// Accepts clients forever, each served by its own task. Never waits for
    /// room: a client beyond the limits is told at once that the daemon is
    /// busy, and disconnected.
    async fn accept_loop(&mut self) {
        loop {
            let stream = self.accept().await;
            let state = Arc::clone(&self.state);
            let shutdown = Shutdown::new(self.notify_shutdown.subscribe());
            let done = self.shutdown_complete.clone();
            let room = self.limit_connections.available_permits() > 0;
            let pending = match room {
                true => self.pending_place().await,
                false => None,
            };
            let admission = pending.map(|pending| Admission {
                pending: Some(pending),
                slots: Arc::clone(&self.limit_connections),
                slot: None,
                room_wanted: Arc::clone(&self.room_wanted),
            });
            tokio::spawn(async move {
                let served = match admission {
                    Some(admission) => connection::serve(stream, state, shutdown, admission).await,
                    None => {
                        warn!("refused a client: every connection is taken");
                        connection::refuse(stream, busy()).await
                    }
                };
                if let Err(error) = served {
                    warn!(%error, "connection failed");
                }
                drop(done);
            });
        }
    }

    /// A place among the connections waiting for their first message. When
    /// none is free, connections that have said nothing for a while are asked
    /// to make way, and their places are waited for briefly.
    async fn pending_place(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(place) = Arc::clone(&self.limit_pending).try_acquire_owned() {
            return Some(place);
        }
        self.room_wanted.store(true, Ordering::Relaxed);
        let place = Arc::clone(&self.limit_pending).acquire_owned();
        let place = tokio::time::timeout(MAKE_WAY, place).await;
        self.room_wanted.store(false, Ordering::Relaxed);
        place.ok().and_then(Result::ok)
    }

    /// The next client. Failures (such as running out of file descriptors)
    /// are retried after a pause that doubles up to a second, never spinning.
    async fn accept(&mut self) -> UnixStream {
        let (shortest, longest) = ACCEPT_BACKOFF;
        let mut pause = shortest;
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => return stream,
                Err(error) => {
                    error!(%error, retry_in = ?pause, "accept failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(longest);
                }
            }
        }
    }
}
