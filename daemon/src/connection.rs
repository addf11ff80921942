//! One client: who it is, then its messages until it leaves, breaks the
//! protocol, or the daemon shuts down.
//!
//! Requests are served concurrently, each by its own task, so a client can
//! send `cancel` while its `generate` runs. Every response and notification
//! goes through one channel to one writer task, which alone writes the socket.
//! A client that leaves cancels its generations, queued or running.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use odmoe_protocol::{
    ErrorCode, Message, MessageReader, Method, ReadError, Request, Response, RpcError, encode,
};
use tokio::io::{AsyncWriteExt, BufWriter, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::dispatch;
use crate::logging::untrusted;
use crate::peer::{Peer, peer_allowed, peer_uid};
use crate::shutdown::Shutdown;
use crate::state::State;

/// Messages waiting for the writer; requests that produce more wait for room.
const OUTGOING: usize = 256;

/// Why the read loop ended.
enum End {
    /// The client left, or its stream broke, or it was too slow: its work is
    /// abandoned.
    Gone,
    /// The client closed its writing side: it waits for its answers.
    DoneSending,
    /// The daemon is stopping: answers in flight are still written.
    Shutdown,
}

/// A connection's claim on the daemon's capacity. It starts pending (its
/// `pending` permit counts against how many connections may be waiting for
/// their first message) and becomes one of the `max_connections` clients
/// served with its first complete message, so stalled connections that never
/// finish a message cannot lock the others out.
#[derive(Debug)]
pub struct Admission {
    /// Held until the first message is complete.
    pub pending: Option<OwnedSemaphorePermit>,
    /// The clients served at once.
    pub slots: Arc<Semaphore>,
    /// Held from the first message on.
    pub slot: Option<OwnedSemaphorePermit>,
    /// Set while a new connection waits for a pending place: connections that
    /// have said nothing for a while then give theirs up.
    pub room_wanted: Arc<AtomicBool>,
}

impl Admission {
    /// Takes a place among the clients served; false when all are taken.
    fn admit(&mut self) -> bool {
        if self.slot.is_none() {
            match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(slot) => self.slot = Some(slot),
                Err(_) => return false,
            }
            self.pending = None;
        }
        true
    }
}

/// The answer to a client the daemon has no room for, before it hangs up.
pub fn busy() -> Message {
    connection_error(RpcError::new(
        ErrorCode::Busy,
        "odmoed serves as many clients as it may (server.max_connections); try again later",
    ))
}

/// How often a connection looks at its timeouts.
const TIMEOUT_CHECK: Duration = Duration::from_secs(1);

/// Serves one client until it disconnects, sends something unreadable, or the
/// daemon shuts down. Errors end only this connection.
pub async fn serve(
    stream: UnixStream,
    state: Arc<State>,
    mut shutdown: Shutdown,
    mut admission: Admission,
) -> io::Result<()> {
    let uid = peer_uid(&stream).map_err(io::Error::from)?;
    if !peer_allowed(uid, state.uid) {
        warn!(peer_uid = uid, "refused a connection from another user");
        let error = RpcError::new(
            ErrorCode::Unauthorized,
            "this odmoed serves only the user that started it",
        );
        return refuse(stream, connection_error(error)).await;
    }
    let (read, write) = stream.into_split();
    debug!(peer_uid = uid, "client connected");
    let limits = state.limits;
    let mut reader = MessageReader::new(read, state.max_message_bytes);
    let (out, outgoing) = mpsc::channel(OUTGOING);
    let writer = tokio::spawn(write_messages(write, outgoing));
    let peer = Arc::new(Peer::new(out, uid));
    let mut tasks = JoinSet::new();
    let connected = Instant::now();
    // Last time a message arrived or a request finished.
    let mut active = connected;
    // When the message being read began to arrive.
    let mut partial_since = None;
    let mut ticker = tokio::time::interval(TIMEOUT_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let end = loop {
        let message = tokio::select! {
            biased;
            () = shutdown.recv() => break End::Shutdown,
            Some(_) = tasks.join_next() => {
                active = Instant::now();
                continue;
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                partial_since = match (reader.has_partial_message(), partial_since) {
                    (false, _) => None,
                    (true, None) => Some(now),
                    (true, since) => since,
                };
                // A client may connect long before its first request (an
                // editor at start-up): a silent one only makes way when a new
                // connection needs its place. A begun message must finish.
                let silent_too_long = admission.slot.is_none()
                    && partial_since.is_none()
                    && now.duration_since(connected) >= limits.message
                    && admission.room_wanted.load(Ordering::Relaxed);
                let message_late =
                    partial_since.is_some_and(|since| now.duration_since(since) >= limits.message);
                if silent_too_long || message_late {
                    debug!(timeout = ?limits.message, "closing a connection whose message is late");
                    break End::Gone;
                }
                let idle = tasks.is_empty() && !reader.has_partial_message();
                if idle && limits.idle.is_some_and(|limit| now.duration_since(active) >= limit) {
                    debug!("closing an idle connection");
                    break End::Gone;
                }
                continue;
            }
            // At the cap of requests in flight, nothing more is read until
            // answers are written: a client that never reads its replies
            // cannot pile up work and memory.
            message = reader.read_message(), if tasks.len() < limits.max_in_flight => message,
        };
        match message {
            Ok(None) => {
                debug!("client finished sending");
                break End::DoneSending;
            }
            Ok(Some(message)) if !admission.admit() => {
                drop(message);
                warn!("refused a client: every connection is taken");
                peer.send(busy()).await;
                break End::Gone;
            }
            Ok(Some(Message::Request(request))) => {
                active = Instant::now();
                partial_since = None;
                debug!(msgid = request.msgid, method = %untrusted(&request.method), "request");
                start(&mut tasks, request, Answer::Response, &state, &peer).await;
            }
            Ok(Some(Message::Notification(notification))) => {
                active = Instant::now();
                partial_since = None;
                let method = untrusted(&notification.method);
                match dispatch::relayed_request(notification) {
                    Some(request) => {
                        debug!(id = request.msgid, %method, "relayed request");
                        start(&mut tasks, request, Answer::Relayed, &state, &peer).await;
                    }
                    None => debug!(%method, "ignoring a notification"),
                }
            }
            Ok(Some(Message::Response(response))) => {
                active = Instant::now();
                debug!(
                    msgid = response.msgid,
                    "ignoring a response: odmoed sends no requests"
                );
            }
            Err(ReadError::Invalid(invalid)) => {
                warn!(error = %untrusted(&invalid.to_string()), "invalid message");
                let msgid = invalid.msgid.unwrap_or(0);
                peer.send(Response::error(msgid, invalid.error)).await;
            }
            Err(ReadError::Frame(error)) => {
                // Unreadable bytes or a message over the limit: the stream
                // cannot be resynchronised, so say why and hang up.
                warn!(%error, "closing the connection");
                peer.send(connection_error(error.to_rpc_error())).await;
                break End::Gone;
            }
            Err(ReadError::Truncated { buffered }) => {
                debug!(buffered, "client left in the middle of a message");
                break End::Gone;
            }
            Err(ReadError::Io(error)) => {
                debug!(%error, "reading from the client failed");
                break End::Gone;
            }
        }
    };

    match end {
        End::Gone => {
            // Nobody will read the answers: stop the work now.
            peer.cancel_all(&state.scheduler);
            tasks.shutdown().await;
        }
        End::DoneSending => {
            // A client that only closed its writing side (`shutdown(SHUT_WR)`)
            // still reads its answers; one that is gone altogether cannot, and
            // its work stops as soon as that shows.
            let gone = client_gone(reader.get_ref(), &peer);
            tokio::pin!(gone);
            loop {
                tokio::select! {
                    next = tasks.join_next() => if next.is_none() { break },
                    () = &mut gone => {
                        peer.cancel_all(&state.scheduler);
                        tasks.shutdown().await;
                        break;
                    }
                }
            }
        }
        End::Shutdown => {
            // The scheduler has cancelled the generations; their tasks write
            // the "cancelled" answers, then the writer drains.
            while tasks.join_next().await.is_some() {}
        }
    }
    drop(peer);
    writer.await.map_err(io::Error::other)?
}

/// Completes when the client has closed both directions (its socket reports
/// a hang-up, not just the end of what it sends) or its answers can no longer
/// be written.
async fn client_gone(read: &OwnedReadHalf, peer: &Peer) {
    let hung_up = async {
        loop {
            match read.ready(Interest::WRITABLE).await {
                Ok(ready) if ready.is_write_closed() => return,
                Ok(_) => tokio::time::sleep(TIMEOUT_CHECK).await,
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        () = hung_up => {}
        () = peer.closed() => {}
    }
}

/// Tells a client why it is not served, then hangs up.
pub async fn refuse(stream: UnixStream, why: Message) -> io::Result<()> {
    let (_, write) = stream.into_split();
    let (out, outgoing) = mpsc::channel(1);
    let _ = out.send(why).await;
    drop(out);
    write_messages(write, outgoing).await
}

/// How a request is answered: with a response, or through its relay (it came as a
/// notification; see `odmoe_protocol::Relay`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Response,
    Relayed,
}

/// Starts answering `request` on its own task, registering a generation so that `cancel` and
/// a disconnect can stop it.
async fn start(
    tasks: &mut JoinSet<()>,
    request: Request,
    answer: Answer,
    state: &Arc<State>,
    peer: &Arc<Peer>,
) {
    let generates = matches!(
        Method::from_name(&request.method),
        Some(Method::Generate | Method::Chat)
    );
    if generates && peer.in_flight(request.msgid).is_some() {
        // A second generation under a msgid in flight could not be told apart by `cancel` or
        // by its notifications.
        let error = RpcError::new(
            ErrorCode::InvalidRequest,
            format!(
                "msgid {} is already used by a generation in flight",
                request.msgid
            ),
        );
        match answer {
            Answer::Response => {
                peer.send(Response::error(request.msgid, error)).await;
            }
            Answer::Relayed => dispatch::relay_error(&request, peer, error).await,
        }
        return;
    }
    let cancel = generates.then(|| peer.start(request.msgid));
    let (state, peer) = (Arc::clone(state), Arc::clone(peer));
    match answer {
        Answer::Response => tasks.spawn(dispatch::answer(request, state, peer, cancel)),
        Answer::Relayed => tasks.spawn(dispatch::answer_relayed(request, state, peer, cancel)),
    };
}

/// An error that no request can be tied to: msgid 0, as Neovim does.
fn connection_error(error: RpcError) -> Message {
    Response::error(0, error).into()
}

/// Writes what arrives on `outgoing` until every sender is gone, flushing
/// whenever nothing more is waiting, then closes the stream.
async fn write_messages(
    write: OwnedWriteHalf,
    mut outgoing: mpsc::Receiver<Message>,
) -> io::Result<()> {
    let mut writer = BufWriter::new(write);
    while let Some(message) = outgoing.recv().await {
        let written = async {
            writer.write_all(&encode(&message)).await?;
            if outgoing.is_empty() {
                writer.flush().await?;
            }
            Ok::<_, io::Error>(())
        };
        if let Err(error) = written.await {
            // The client is gone; the read side notices too.
            debug!(%error, "writing to the client failed");
            return Ok(());
        }
    }
    writer.flush().await?;
    let _ = writer.shutdown().await;
    Ok(())
}
