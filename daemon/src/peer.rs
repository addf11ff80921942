//! The client at the other end of a connection: who it is, by the kernel's
//! word (SO_PEERCRED, getpeereid), what it may do, and what its request tasks
//! share (the way to its writer, the generations it has in flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use odmoe_engine::lock::recover;
use odmoe_protocol::{Message, Notification, Relay, Value, to_value};
use serde::Serialize;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::warn;

use crate::scheduler::{CancelToken, Scheduler};

/// Whether a peer running as `peer_uid` may use a daemon running as `daemon_uid`:
/// the same user, or root.
pub fn peer_allowed(peer_uid: u32, daemon_uid: u32) -> bool {
    peer_uid == daemon_uid || peer_uid == 0
}

/// The uid of the process at the other end of `stream`, from the kernel.
pub fn peer_uid(stream: &UnixStream) -> nix::Result<u32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        getsockopt(stream, PeerCredentials).map(|credentials| credentials.uid())
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        nix::unistd::getpeereid(stream).map(|(uid, _)| uid.as_raw())
    }
}

/// What the request tasks of one connection share.
#[derive(Debug)]
pub struct Peer {
    /// Feeds the writer task.
    out: mpsc::Sender<Message>,
    /// The generations in flight, by msgid, so `cancel` and a disconnect can stop them.
    in_flight: Mutex<HashMap<u32, Arc<CancelToken>>>,
    /// The client's uid, from the kernel, for methods that check it again.
    pub uid: u32,
}

impl Peer {
    /// A client running as `uid` whose messages go to `out`.
    pub fn new(out: mpsc::Sender<Message>, uid: u32) -> Peer {
        Peer {
            out,
            in_flight: Mutex::new(HashMap::new()),
            uid,
        }
    }

    /// Queues `message` for the client; false if the client is gone.
    pub async fn send(&self, message: impl Into<Message>) -> bool {
        self.out.send(message.into()).await.is_ok()
    }

    /// Queues a notification for the client; false if the client is gone.
    pub async fn notify<T: Serialize>(&self, method: &str, params: &T) -> bool {
        match Notification::new(method, params) {
            Ok(notification) => self.send(notification).await,
            Err(error) => {
                warn!(%error, method, "cannot encode a notification");
                true
            }
        }
    }

    /// Sends event `name` of a generation: as odmoed's own notification, or through `relay` as
    /// a call of the client's own method with `[name, event]` after the relay's arguments.
    pub async fn event<T: Serialize>(&self, relay: Option<&Relay>, name: &str, event: &T) -> bool {
        let Some(relay) = relay else {
            return self.notify(name, event).await;
        };
        match to_value(event) {
            Ok(event) => {
                let mut args = relay.args.clone();
                args.push(Value::Array(vec![Value::from(name), event]));
                self.send(Notification::positional(relay.method.as_str(), args))
                    .await
            }
            Err(error) => {
                warn!(%error, name, "cannot encode an event");
                true
            }
        }
    }

    /// The cancel token of the generation `msgid`, if it is in flight.
    pub fn in_flight(&self, msgid: u32) -> Option<Arc<CancelToken>> {
        self.lock().get(&msgid).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<CancelToken>>> {
        recover(self.in_flight.lock())
    }

    /// Registers a generation before its task starts, so that a `cancel` read
    /// right after it finds it.
    pub fn start(&self, msgid: u32) -> Arc<CancelToken> {
        let token = Arc::new(CancelToken::default());
        self.lock().insert(msgid, Arc::clone(&token));
        token
    }

    /// Forgets the generation `msgid` once answered, unless a newer one took
    /// its msgid meanwhile.
    pub fn finish(&self, msgid: u32, token: &Arc<CancelToken>) {
        let mut in_flight = self.lock();
        if in_flight
            .get(&msgid)
            .is_some_and(|current| Arc::ptr_eq(current, token))
        {
            in_flight.remove(&msgid);
        }
    }

    /// Cancels every generation of this client, taking those still queued
    /// out of `scheduler`'s queue.
    pub fn cancel_all(&self, scheduler: &Scheduler) {
        let tokens: Vec<_> = self.lock().values().cloned().collect();
        for token in tokens {
            token.cancel();
            scheduler.withdraw(&token);
        }
    }

    /// Completes when nothing more can be sent to the client.
    pub async fn closed(&self) {
        self.out.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_user_or_root_may_connect() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(1000, 0));
    }
}
