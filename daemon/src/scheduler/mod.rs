//! The engine thread: the only place that touches the model.
//!
//! One `std::thread` owns the loaded model and the kept sessions. Connection
//! tasks hand it jobs through a FIFO queue and hear back through channels:
//! a generation sends [`Event`]s (text as it is produced, then the result) on
//! its own tokio channel, so a slow client never stalls the engine. Each
//! generation carries a [`CancelToken`] that the per-token callback checks, so
//! a cancelled generation stops within one token step; a job still waiting is
//! taken out of the queue at once.
//!
//! The engine loop pops one job at a time. Batching several sessions per step
//! fits here later: the loop would pop every waiting generation and step them
//! together, with nothing outside this module changing.
//!
//! Sessions are named conversations whose KV cache and tokens are kept between
//! requests, so a follow-up turn prefills only what is new. At most
//! `sessions.max_sessions` are kept (the least recently used goes first), and a
//! session idle for `sessions.idle_expiry_secs` is dropped.
//!
//! The memory-pressure controller steers the expert budget through
//! [`Directive`]s that this thread applies between two tokens
//! or two jobs, never in the middle of a layer: the store evicts unpinned
//! experts down to the new budget, and under critical pressure the kept
//! sessions' KV caches are dropped and freed memory is given back.
//!
//! What comes back is the engine's own: a [`Finished`] generation, a
//! [`ModelDescription`], a [`SchedulerError`]. Turning them into answers on
//! the wire is the caller's business.

mod engine;
mod job;
mod prefixes;
mod sessions;

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use odmoe_engine::lock::recover;
use odmoe_engine::store::ExpertStore;
use odmoe_engine::tokenizer::Tokenizer;
use tokio::sync::oneshot;
use tracing::warn;

use self::engine::Engine;
use self::job::Job;
pub use self::job::{CancelToken, ChatTurn, Event, Finished, GenerateJob, SchedulerError};
use crate::budget::BudgetSpec;
use crate::pressure::{Directive, Pressure};
use crate::settings::Settings;

/// The loaded model as connection tasks see it: what they need to check and
/// tokenize a request without waiting for the engine thread.
pub struct Served {
    /// Counts loads; jobs carry it to detect a model replaced while they waited.
    pub epoch: u64,
    /// What `models` and `stats` report (the budget as at load).
    pub info: ModelDescription,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Most positions a sequence may hold: prompt and reply must fit.
    pub context_length: usize,
    /// The model's tokenizer: its `tokenizer.json` or its GGUF vocabulary.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The expert store, when experts are loaded on demand.
    pub store: Option<Arc<ExpertStore>>,
}

/// The loaded model, as `models` and `stats` describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescription {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Its `model_type`, e.g. `qwen3_moe`.
    pub architecture: String,
    /// Decoder layers.
    pub layers: usize,
    /// Experts in each MoE layer (0 for a dense model).
    pub experts_per_layer: usize,
    /// Experts routed per token.
    pub experts_per_token: usize,
    /// Bytes of one expert as the store counts them (GGUF experts at their
    /// stored size, others in f32), the mean over the layers with experts.
    pub expert_bytes: u64,
    /// Bytes of every expert together.
    pub total_expert_bytes: u64,
    /// Where its experts live.
    pub mode: ModelMode,
    /// The expert budget at load, when experts load on demand.
    pub budget_bytes: Option<u64>,
}

/// Where a loaded model's experts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelMode {
    /// A dense model: no experts, every weight resident.
    Dense,
    /// Every expert read at load and kept.
    Resident,
    /// Experts read on demand into a store under a budget.
    OnDemand,
}

impl fmt::Display for ModelMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelMode::Dense => "dense",
            ModelMode::Resident => "resident",
            ModelMode::OnDemand => "on_demand",
        })
    }
}

/// Jobs waiting and running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLength {
    /// Jobs in the queue.
    pub waiting: usize,
    /// Whether a job runs.
    pub running: bool,
}

/// The kept sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionsKept {
    /// How many.
    pub count: usize,
    /// The bytes of their KV caches.
    pub kv_bytes: u64,
    /// KV caches in the prefix cache (requests without a session).
    pub prefixes: usize,
    /// Their bytes.
    pub prefix_bytes: u64,
}

/// The queue and what the engine thread publishes, shared with every handle.
struct Shared {
    /// Jobs waiting, and whether one runs.
    queue: Mutex<Queue>,
    /// Wakes the engine thread when a job arrives or the daemon stops.
    wake: Condvar,
    /// The loaded model, replaced by the engine thread on load and unload.
    served: RwLock<Option<Arc<Served>>>,
    /// Kept sessions, as last published by the engine thread.
    sessions: Mutex<SessionsKept>,
    /// Generations finished (in any way) since start.
    requests: AtomicU64,
    /// When the idle model is unloaded (its keep_alive), if it is to be.
    unload_at: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Jobs in arrival order.
    waiting: VecDeque<Job>,
    /// The cancel token of the generation running, or a placeholder for a
    /// load or unload; `None` when the engine is idle.
    running: Option<Arc<CancelToken>>,
    /// Set once by [`Scheduler::stop`]; nothing is queued after it.
    stopping: bool,
    /// The latest budget directive not yet applied; a newer one replaces it.
    directive: Option<Directive>,
}

/// The handle to the engine thread, shared by every connection.
pub struct Scheduler {
    /// The queue and the published state.
    shared: Arc<Shared>,
    /// The engine thread, taken by [`Scheduler::join`].
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("epoch", &self.epoch)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("queue", &self.queue_length())
            .field("served", &self.served())
            .finish_non_exhaustive()
    }
}

/// Locks `mutex` whatever a panic left: every critical section here leaves its data
/// consistent, and the daemon must keep serving.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    recover(mutex.lock())
}

impl Scheduler {
    /// Starts the engine thread, with no model loaded. `settings` gives the
    /// session limits, read again at every job so that SIGHUP applies them;
    /// `pressure` sizes the expert budget of each model loaded, and its
    /// directives reach this thread through [`Scheduler::director`].
    pub fn start(
        settings: Arc<RwLock<Settings>>,
        pressure: Arc<Pressure>,
    ) -> std::io::Result<Scheduler> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            served: RwLock::new(None),
            sessions: Mutex::new(SessionsKept::default()),
            requests: AtomicU64::new(0),
            unload_at: Mutex::new(None),
        });
        let engine = Engine::new(Arc::clone(&shared), settings, pressure);
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || engine.run())?;
        Ok(Scheduler {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands budget directives to the engine thread, which applies the latest
    /// one between two tokens, or at once when idle.
    pub fn director(&self) -> impl Fn(Directive) + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move |directive| {
            lock(&shared.queue).directive = Some(directive);
            shared.wake.notify_all();
        }
    }

    /// The loaded model, if any.
    pub fn served(&self) -> Option<Arc<Served>> {
        recover(self.shared.served.read()).clone()
    }

    /// Queues a generation. Returns how many jobs are ahead of it (the running
    /// one included), or `None` if the daemon is stopping.
    pub fn submit(&self, job: GenerateJob) -> Option<u32> {
        let mut queue = lock(&self.shared.queue);
        if queue.stopping {
            return None;
        }
        let ahead = queue.waiting.len() + usize::from(queue.running.is_some());
        queue.waiting.push_back(Job::Generate {
            job,
            queued: Instant::now(),
        });
        self.shared.wake.notify_one();
        Some(u32::try_from(ahead).unwrap_or(u32::MAX))
    }

    /// Takes the generation cancelled by `cancel` out of the queue, answering it
    /// "cancelled" at once. False if it is not waiting (it runs, or is done).
    pub fn withdraw(&self, cancel: &Arc<CancelToken>) -> bool {
        let job = {
            let mut queue = lock(&self.shared.queue);
            let at = queue.waiting.iter().position(
                |job| matches!(job, Job::Generate { job, .. } if Arc::ptr_eq(&job.cancel, cancel)),
            );
            at.and_then(|at| queue.waiting.remove(at))
        };
        match job {
            Some(job) => {
                job.cancel("cancelled");
                true
            }
            None => false,
        }
    }

    /// Loads the model at `path`, replacing the loaded one and dropping every
    /// session. Waits behind the jobs already queued.
    pub async fn load(
        &self,
        path: PathBuf,
        budget: BudgetSpec,
    ) -> Result<ModelDescription, SchedulerError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Job::Load {
            path,
            budget,
            reply,
        });
        answer.await.unwrap_or(Err(SchedulerError::Stopped))
    }

    /// Drops the model and every session; true if a model was loaded.
    pub async fn unload(&self) -> Result<bool, SchedulerError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Job::Unload { reply });
        answer.await.unwrap_or(Err(SchedulerError::Stopped))
    }

    fn enqueue(&self, job: Job) {
        let mut queue = lock(&self.shared.queue);
        if queue.stopping {
            drop(queue);
            job.cancel("odmoed is shutting down");
            return;
        }
        queue.waiting.push_back(job);
        self.shared.wake.notify_one();
    }

    /// Makes the engine thread read the settings again (after SIGHUP), so a
    /// shorter `idle_expiry_secs` applies at once.
    pub fn settings_changed(&self) {
        self.shared.wake.notify_all();
    }

    /// Jobs waiting and running.
    pub fn queue_length(&self) -> QueueLength {
        let queue = lock(&self.shared.queue);
        QueueLength {
            waiting: queue.waiting.len(),
            running: queue.running.is_some(),
        }
    }

    /// Sessions kept and the bytes of their KV caches.
    pub fn sessions_kept(&self) -> SessionsKept {
        *lock(&self.shared.sessions)
    }

    /// How long until the idle model is unloaded; `None` while it stays.
    pub fn unloads_in(&self) -> Option<Duration> {
        lock(&self.shared.unload_at).map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Generations finished since start.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Stops taking jobs, answers every waiting one "cancelled", and cancels
    /// the running generation; the engine thread then exits.
    pub fn stop(&self) {
        let (waiting, running) = {
            let mut queue = lock(&self.shared.queue);
            queue.stopping = true;
            (std::mem::take(&mut queue.waiting), queue.running.clone())
        };
        if let Some(running) = running {
            running.cancel();
        }
        for job in waiting {
            job.cancel("odmoed is shutting down");
        }
        self.shared.wake.notify_all();
    }

    /// Waits up to `grace` for the engine thread to exit after [`Scheduler::stop`];
    /// false if it is still busy (a load cannot be interrupted).
    pub fn join(&self, grace: Duration) -> bool {
        let Some(thread) = lock(&self.thread).take() else {
            return true;
        };
        let deadline = Instant::now() + grace;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.join().is_err() {
            warn!("the engine thread panicked");
        }
        true
    }
}
