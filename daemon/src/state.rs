//! What every connection shares: the engine, the live settings, the memory
//! controller, the limits of a client, and the request to shut down.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use odmoe_engine::lock::recover;
use tokio::sync::watch;

use crate::pressure::Pressure;
use crate::scheduler::Scheduler;
use crate::settings::Settings;

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
        recover(self.settings.read()).clone()
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
    pub async fn shutdown_requested(&self) {
        let mut requested = self.shutdown.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = requested.wait_for(|&requested| requested).await;
    }
}

/// What one client may hold of the daemon, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Requests in flight before reading pauses.
    pub max_in_flight: usize,
    /// How long a connection may idle; `None` forever.
    pub idle: Option<Duration>,
    /// How long a begun message, or a new connection's first one, may take.
    pub message: Duration,
}

impl ConnectionLimits {
    /// The limits `[server]` sets.
    pub fn from_config(server: &odmoe_config::ServerConfig) -> ConnectionLimits {
        ConnectionLimits {
            max_in_flight: server.max_requests_per_connection.max(1) as usize,
            idle: (server.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(server.idle_timeout_secs)),
            message: Duration::from_secs(server.message_timeout_secs.max(1)),
        }
    }
}
