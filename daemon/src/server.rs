//! The listening socket, the accept loop and graceful shutdown.
//!
//! [`bind`] prepares the socket file: a private directory that no other user
//! can enter or swap for their own (see [`socket::private_dir`]), no second
//! daemon on the same path, a stale socket left by a killed daemon replaced,
//! the socket itself 0600.
//! [`activated`] takes the socket systemd or launchd passed instead.
//! [`run`] accepts clients until a signal or a `shutdown` request, then stops
//! accepting, removes the socket file, cancels the generations in flight and
//! waits (for a grace period) for every handler to write its last answers.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tracing::{error, info, warn};

use crate::connection::{self, Admission, ConnectionLimits, busy};
use crate::pressure::Pressure;
use crate::scheduler::Scheduler;
use crate::settings::Settings;
use crate::shutdown::Shutdown;
use crate::socket;

/// What every connection handler shares.
#[derive(Debug)]
pub struct State {
    /// Largest message accepted from a client, in bytes.
    pub max_message_bytes: usize,
    /// What one client may hold: requests in flight, idle and message time.
    pub limits: ConnectionLimits,
    /// The daemon's effective uid: a peer must have it, or be root.
    pub uid: u32,
    /// The engine thread: the model, the queue and the sessions.
    pub scheduler: Scheduler,
    /// The config keys that SIGHUP can change.
    pub settings: Arc<RwLock<Settings>>,
    /// The memory-pressure controller: the expert budget and what moved it.
    pub pressure: Arc<Pressure>,
    /// When the daemon started, for `stats`.
    pub started: Instant,
    /// Becomes true when a client asks the daemon to stop.
    shutdown: watch::Sender<bool>,
}

impl State {
    /// State for a daemon whose engine is `scheduler`, with messages up to
    /// `max_message_bytes`.
    pub fn new(
        scheduler: Scheduler,
        settings: Arc<RwLock<Settings>>,
        pressure: Arc<Pressure>,
        max_message_bytes: usize,
        limits: ConnectionLimits,
    ) -> State {
        State {
            max_message_bytes,
            limits,
            uid: nix::unistd::geteuid().as_raw(),
            scheduler,
            settings,
            started: pressure.started(),
            pressure,
            shutdown: watch::Sender::new(false),
        }
    }

    /// The live settings as they are now.
    pub fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Asks the server to shut down gracefully.
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Whether [`State::request_shutdown`] has been called.
    #[cfg(test)]
    pub fn shutdown_was_requested(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Completes once [`State::request_shutdown`] has been called.
    async fn shutdown_requested(&self) {
        let mut requested = self.shutdown.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = requested.wait_for(|&requested| requested).await;
    }
}

/// A socket bound at a path, with the file that goes away with it, or a
/// socket handed over by the service manager.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listening socket, not yet registered with a runtime (so it can be
    /// bound before the daemon detaches).
    listener: StdUnixListener,
    /// The socket file, removed on drop; `None` when the service manager owns it.
    file: Option<SocketFile>,
}

impl BoundSocket {
    /// The socket's path, when this daemon bound it.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|file| file.path.as_path())
    }
}

/// Removes the socket file on drop, if it is still the one this daemon bound
/// (another daemon may have replaced it meanwhile).
#[derive(Debug)]
struct SocketFile {
    /// Where the socket file is.
    path: PathBuf,
    /// Device and inode of the file at bind time.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == self.id);
        if ours && let Err(error) = fs::remove_file(&self.path) {
            warn!(path = %self.path.display(), %error, "cannot remove the socket file");
        }
    }
}

/// Binds the socket at `path`: see the module documentation for the rules.
pub fn bind(path: &Path) -> anyhow::Result<BoundSocket> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .with_context(|| format!("socket path {} has no directory", path.display()))?;
    socket::private_dir(dir)?;
    remove_stale_socket(path)?;
    let listener = StdUnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    let meta = fs::symlink_metadata(path)?;
    Ok(BoundSocket {
        listener,
        file: Some(SocketFile {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        }),
    })
}

/// The listening socket systemd or launchd passed to this process (socket
/// activation), if any. Call it before any thread starts: on Linux it clears
/// the `LISTEN_*` variables so that children do not take the socket for theirs.
pub fn activated() -> anyhow::Result<Option<BoundSocket>> {
    let listener = activated_listener()?;
    Ok(listener.map(|listener| BoundSocket {
        listener,
        file: None,
    }))
}

/// systemd: `LISTEN_PID` names this process and `LISTEN_FDS` counts the
/// sockets passed from fd 3 (`SD_LISTEN_FDS_START`) on; the first is ours.
#[cfg(target_os = "linux")]
fn activated_listener() -> anyhow::Result<Option<StdUnixListener>> {
    use std::os::fd::FromRawFd;
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    if var("LISTEN_PID") != Some(std::process::id()) || var("LISTEN_FDS").unwrap_or(0) < 1 {
        return Ok(None);
    }
    // SAFETY: called while the process is single-threaded (see `activated`).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    // SAFETY: systemd passes the listening socket as fd 3, and nothing else in
    // this process owns it.
    Ok(Some(unsafe { StdUnixListener::from_raw_fd(3) }))
}

/// launchd: the socket named `Listeners` in the job's plist.
#[cfg(target_os = "macos")]
fn activated_listener() -> anyhow::Result<Option<StdUnixListener>> {
    use std::ffi::{c_char, c_int, c_void};
    use std::os::fd::FromRawFd;
    unsafe extern "C" {
        fn launch_activate_socket(
            name: *const c_char,
            fds: *mut *mut c_int,
            count: *mut usize,
        ) -> c_int;
        fn free(pointer: *mut c_void);
    }
    const ESRCH: c_int = 3;
    let mut fds: *mut c_int = std::ptr::null_mut();
    let mut count = 0usize;
    // SAFETY: launchd fills `fds` with a malloc'ed array of `count` descriptors.
    let status = unsafe { launch_activate_socket(c"Listeners".as_ptr(), &mut fds, &mut count) };
    if status == ESRCH {
        return Ok(None); // not started by launchd
    }
    if status != 0 {
        bail!("launch_activate_socket(\"Listeners\") failed with error {status}");
    }
    // SAFETY: `fds` holds `count` descriptors that are now ours; the array is freed once read.
    let first = (count > 0).then(|| unsafe { *fds });
    unsafe { free(fds.cast()) };
    Ok(first.map(|fd| unsafe { StdUnixListener::from_raw_fd(fd) }))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn activated_listener() -> anyhow::Result<Option<StdUnixListener>> {
    Ok(None)
}

/// Refuses to start when a daemon already answers at `path`; removes a socket
/// file nobody listens on (left by a daemon that was killed).
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => bail!("cannot inspect {}: {error}", path.display()),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; remove it or choose another --socket",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("odmoed is already running on {}", path.display()),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing a stale socket");
            fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))
        }
        Err(error) => bail!("cannot check socket {}: {error}", path.display()),
    }
}

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
    let BoundSocket { listener, file } = socket;
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
        Some(file) => info!(socket = %file.path.display(), pid = std::process::id(), "listening"),
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
