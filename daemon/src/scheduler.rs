//! The engine thread: the only place that touches the model.
//!
//! One `std::thread` owns the loaded model and the kept sessions. Connection
//! tasks hand it [`Job`]s through a FIFO queue and hear back through channels:
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
//! The memory-pressure controller ([`crate::pressure`]) steers the expert
//! budget through [`Directive`]s that this thread applies between two tokens
//! or two jobs, never in the middle of a layer: the store evicts unpinned
//! experts down to the new budget, and under critical pressure the kept
//! sessions' KV caches are dropped and freed memory is given back.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use odmoe_config::KeepAlive;
use odmoe_engine::generate::{FinishReason, GenerateRequest, Generation, Session};
use odmoe_engine::loader::{self, ExpertMode, LoadOptions, LoadedModel};
use odmoe_engine::store::{ExpertStore, StoreConfig};
use odmoe_engine::tokenizer::{ChatMessage, Tokenizer};
use odmoe_protocol::{
    ErrorCode, GenerateResult, ModelInfo, QueueStats, RpcError, SessionStats, Timings, Usage,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::budget::{BudgetKind, BudgetSpec, Placement};
use crate::memory::{resident_bytes, return_freed_memory};
use crate::pressure::{Directive, ModelMemory, Pressure};
use crate::settings::Settings;

/// Longest the engine thread sleeps without looking at idle sessions, so a
/// changed `idle_expiry_secs` takes effect soon.
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// Set to stop one generation; checked by the engine between tokens.
#[derive(Debug, Default)]
pub struct CancelToken(AtomicBool);

impl CancelToken {
    /// Asks the generation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a generation tells its requester.
#[derive(Debug)]
pub enum Event {
    /// The job left the queue; its prompt of this many tokens is computed next.
    Started { prompt_tokens: usize },
    /// Text that became final with `token`.
    Token { token: u32, text: String },
    /// The end: the result, or why there is none.
    Done(Result<GenerateResult, RpcError>),
}

/// A generation waiting for the engine.
#[derive(Debug)]
pub struct GenerateJob {
    /// The model the prompt was tokenized for ([`Served::epoch`]); a job
    /// outliving its model is refused rather than run with the wrong vocabulary.
    pub epoch: u64,
    /// Prompt tokens, sampling and stop conditions. With a `turn`, the prompt
    /// is made on the engine thread.
    pub request: GenerateRequest,
    /// A `chat` turn in a session: rendered after the session's conversation.
    pub turn: Option<ChatTurn>,
    /// The kept session to continue, if any.
    pub session: Option<String>,
    /// How long the model stays loaded after this job; `None`: the configured.
    pub keep_alive: Option<KeepAlive>,
    /// Set by `cancel`, a disconnect or shutdown.
    pub cancel: Arc<CancelToken>,
    /// Where text and the result go.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A `chat` turn that continues a session's conversation.
#[derive(Debug)]
pub struct ChatTurn {
    /// The messages new in this turn.
    pub messages: Vec<ChatMessage>,
    /// Forget the conversation kept so far first.
    pub new_conversation: bool,
    /// The client left `max_tokens` to the default, which shrinks to what
    /// fits in the context after the conversation.
    pub fit_max_tokens: bool,
}

/// Work for the engine thread.
#[derive(Debug)]
enum Job {
    Generate {
        job: GenerateJob,
        /// When the job was queued, for `timings.queue_ms`.
        queued: Instant,
    },
    Load {
        path: PathBuf,
        budget: BudgetSpec,
        reply: oneshot::Sender<Result<ModelInfo, RpcError>>,
    },
    Unload {
        reply: oneshot::Sender<Result<bool, RpcError>>,
    },
}

impl Job {
    /// Answers the job without running it: the daemon is stopping or it was
    /// cancelled while waiting.
    fn cancel(self, why: &str) {
        match self {
            Job::Generate { job, queued } => {
                let result = cancelled_before_start(&job, queued);
                let _ = job.events.send(Event::Done(Ok(result)));
            }
            Job::Load { reply, .. } => {
                let _ = reply.send(Err(RpcError::new(ErrorCode::Cancelled, why)));
            }
            Job::Unload { reply } => {
                let _ = reply.send(Err(RpcError::new(ErrorCode::Cancelled, why)));
            }
        }
    }
}

/// The loaded model as connection tasks see it: what they need to check and
/// tokenize a request without waiting for the engine thread.
pub struct Served {
    /// Counts loads; jobs carry it to detect a model replaced while they waited.
    pub epoch: u64,
    /// What `models` and `stats` report (the budget as at load).
    pub info: ModelInfo,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Most positions a sequence may hold: prompt and reply must fit.
    pub context_length: usize,
    /// The model's tokenizer: its `tokenizer.json` or its GGUF vocabulary.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The expert store, when experts are loaded on demand.
    pub store: Option<Arc<ExpertStore>>,
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
    sessions: Mutex<SessionStats>,
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
            .field("queue", &self.queue_stats())
            .field("served", &self.served())
            .finish_non_exhaustive()
    }
}

/// Locks `mutex`, ignoring poisoning: every critical section here leaves its
/// data consistent, and the daemon must keep serving.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
            sessions: Mutex::new(SessionStats::default()),
            requests: AtomicU64::new(0),
            unload_at: Mutex::new(None),
        });
        let engine = Engine {
            shared: Arc::clone(&shared),
            settings,
            loaded: None,
            unload_at: None,
            sessions: Sessions::default(),
            epoch: 0,
            pressure,
        };
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
        self.shared
            .served
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
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
    pub async fn load(&self, path: PathBuf, budget: BudgetSpec) -> Result<ModelInfo, RpcError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Job::Load {
            path,
            budget,
            reply,
        });
        answer.await.unwrap_or_else(|_| Err(engine_gone()))
    }

    /// Drops the model and every session; true if a model was loaded.
    pub async fn unload(&self) -> Result<bool, RpcError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Job::Unload { reply });
        answer.await.unwrap_or_else(|_| Err(engine_gone()))
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
    pub fn queue_stats(&self) -> QueueStats {
        let queue = lock(&self.shared.queue);
        QueueStats {
            waiting: u32::try_from(queue.waiting.len()).unwrap_or(u32::MAX),
            running: u32::from(queue.running.is_some()),
        }
    }

    /// Sessions kept and the bytes of their KV caches.
    pub fn session_stats(&self) -> SessionStats {
        lock(&self.shared.sessions).clone()
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

/// What the engine thread owns.
struct Engine {
    /// The queue it serves and where it publishes.
    shared: Arc<Shared>,
    /// Live session limits.
    settings: Arc<RwLock<Settings>>,
    /// The model, its tokenizer and its expert store.
    loaded: Option<LoadedModel>,
    /// When the model, idle, is unloaded (keep_alive); `None` keeps it.
    unload_at: Option<Instant>,
    /// Named conversations of the loaded model.
    sessions: Sessions,
    /// Counts loads, see [`Served::epoch`].
    epoch: u64,
    /// Sizes the budget of each model loaded.
    pressure: Arc<Pressure>,
}

/// What the engine loop does next.
enum Next {
    /// Boxed: a job is large beside the other variants.
    Run(Box<Job>),
    /// Give the store a new budget.
    Apply(Directive),
    /// Nothing to run yet: look at the sessions and wait again.
    Idle,
    Stop,
}

impl Engine {
    fn run(mut self) {
        loop {
            let idle = self.idle_expiry();
            let dropped = self.sessions.expire(idle) + self.sessions.trim(self.max_sessions());
            if dropped > 0 {
                self.publish_sessions();
                // A dropped KV cache is freed memory the allocator would keep.
                return_freed_memory();
            }
            // Only an idle model goes: a request waiting would find none.
            if self.unload_at.is_some_and(|at| at <= Instant::now())
                && lock(&self.shared.queue).waiting.is_empty()
            {
                self.unload();
                info!("keep_alive elapsed: model unloaded");
            }
            let wake = [self.sessions.next_expiry(idle), self.unload_at]
                .into_iter()
                .flatten()
                .min();
            match self.next(wake) {
                Next::Run(job) => {
                    let job = *job;
                    // A panic in the engine fails this job only: its channels
                    // close, so its requester hears of it, and the thread goes on.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.serve(job);
                    }));
                    if served.is_err() {
                        error!("the engine panicked; the request failed");
                        self.publish_sessions();
                    }
                    lock(&self.shared.queue).running = None;
                }
                Next::Apply(directive) => self.apply(directive),
                Next::Idle => {}
                Next::Stop => break,
            }
        }
        debug!("engine thread stopped");
    }

    fn idle_expiry(&self) -> Option<Duration> {
        let settings = self
            .settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let secs = settings.sessions.idle_expiry_secs;
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    fn context_length(&self) -> Option<usize> {
        self.settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .context_length
    }

    fn max_sessions(&self) -> usize {
        let settings = self
            .settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        settings.sessions.max_sessions.max(1) as usize
    }

    /// Waits for a job until `until` (a session's expiry) at the latest, or
    /// until woken (settings changed).
    fn next(&self, until: Option<Instant>) -> Next {
        let mut queue = lock(&self.shared.queue);
        for waited in [false, true] {
            if let Some(directive) = queue.directive.take() {
                return Next::Apply(directive);
            }
            if let Some(job) = queue.waiting.pop_front() {
                queue.running = Some(match &job {
                    Job::Generate { job, .. } => Arc::clone(&job.cancel),
                    Job::Load { .. } | Job::Unload { .. } => Arc::default(),
                });
                return Next::Run(Box::new(job));
            }
            if queue.stopping {
                return Next::Stop;
            }
            if waited {
                break;
            }
            let wait = until.map_or(IDLE_CHECK, |until| {
                until
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_CHECK)
            });
            if wait.is_zero() {
                break;
            }
            queue = self
                .shared
                .wake
                .wait_timeout(queue, wait)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        Next::Idle
    }

    fn serve(&mut self, job: Job) {
        match job {
            Job::Generate { job, queued } => {
                let outcome = self.generate(&job, queued);
                self.shared.requests.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Done(outcome));
                if self.loaded.is_some() {
                    self.keep_alive(job.keep_alive);
                }
            }
            Job::Load {
                path,
                budget,
                reply,
            } => {
                let outcome = self.load(&path, &budget);
                if let Err(error) = &outcome {
                    warn!(model = %path.display(), %error, "load failed");
                }
                let _ = reply.send(outcome);
            }
            Job::Unload { reply } => {
                let unloaded = self.unload();
                if unloaded {
                    info!("model unloaded");
                }
                let _ = reply.send(Ok(unloaded));
            }
        }
    }

    fn generate(&mut self, job: &GenerateJob, queued: Instant) -> Result<GenerateResult, RpcError> {
        let queue_ms = queued.elapsed().as_secs_f64() * 1e3;
        if job.cancel.is_cancelled() || job.events.is_closed() {
            return Ok(cancelled_before_start(job, queued));
        }
        let Some(loaded) = &self.loaded else {
            return Err(no_model());
        };
        if job.epoch != self.epoch {
            return Err(RpcError::new(
                ErrorCode::Cancelled,
                "the model was replaced while this request waited; send it again",
            ));
        }
        let model = &loaded.model;
        let store = loaded.store.clone();
        let (mut session, mut conversation) = job
            .session
            .as_ref()
            .and_then(|name| self.sessions.take(name))
            .unwrap_or_else(|| (Session::new(model), Vec::new()));
        if job.turn.as_ref().is_some_and(|turn| turn.new_conversation) {
            conversation.clear();
        }
        // A turn that fails is not kept: the conversation stays as it was.
        let mut before_turn = conversation.len();
        let request = match &job.turn {
            Some(turn) => {
                conversation.extend(turn.messages.iter().cloned());
                let prompt = render_turn(loaded, &mut conversation, turn, &job.request);
                match prompt {
                    Ok((request, dropped)) => {
                        before_turn -= dropped;
                        Cow::Owned(request)
                    }
                    Err(error) => {
                        conversation.truncate(before_turn);
                        if let Some(name) = &job.session {
                            let max = self.max_sessions();
                            self.sessions.put(name.clone(), session, conversation, max);
                        }
                        return Err(error);
                    }
                }
            }
            None => Cow::Borrowed(&job.request),
        };
        let (shared, epoch) = (&self.shared, self.epoch);
        let mut relieve = false;
        let _ = job.events.send(Event::Started {
            prompt_tokens: request.prompt.len(),
        });
        let outcome = session.generate(model, loaded.tokenizer.as_deref(), &request, |delta| {
            // Between two tokens no expert is pinned: the budget can change.
            let directive = lock(&shared.queue).directive.take();
            if let Some(directive) = directive.filter(|d| d.epoch == epoch) {
                if let Some(store) = &store {
                    set_budget(store, &directive);
                }
                // The sessions kept are dropped once this one is done with.
                relieve |= directive.relieve;
            }
            // The text goes out even when cancelled, so that the events add up
            // to the result's text.
            let delivered = job
                .events
                .send(Event::Token {
                    token: delta.token,
                    text: delta.text.clone(),
                })
                .is_ok();
            delivered && !job.cancel.is_cancelled()
        });
        if relieve {
            self.relieve();
        }
        if job.turn.is_some() {
            match &outcome {
                Ok(generation) => {
                    conversation.push(ChatMessage::new("assistant", &generation.text));
                }
                Err(_) => conversation.truncate(before_turn),
            }
        }
        if let Some(name) = &job.session {
            let max = self.max_sessions();
            self.sessions.put(name.clone(), session, conversation, max);
            self.publish_sessions();
        }
        let generation = outcome.map_err(engine_error)?;
        Ok(result_of(generation, queue_ms))
    }

    fn load(&mut self, path: &Path, budget: &BudgetSpec) -> Result<ModelInfo, RpcError> {
        let invalid = |error: String| RpcError::new(ErrorCode::InvalidParams, error);
        let started = Instant::now();
        // Everything that can be checked without the weights is checked before
        // the loaded model is dropped, so a typo does not leave no model at all.
        let (config, total) = loader::describe(path).map_err(|error| invalid(error.to_string()))?;
        let dense = loader::is_dense(&config);
        let placement = if dense {
            Placement::Resident
        } else {
            budget.resolve(total)
        };
        if let Placement::OnDemand(BudgetKind::Fixed(bytes)) = placement {
            loader::check_budget(&config, total, bytes)
                .map_err(|error| invalid(format!("expert_budget: {error}")))?;
        }
        if dense {
            info!(model = %path.display(), "dense model: every weight resident, the expert budget does not apply");
        }
        let device = odmoe_engine::default_device().map_err(engine_error)?;
        // The store reads nothing until the first token, so the whole of the
        // experts will do as a budget until the real one is known.
        let experts = match placement {
            Placement::Resident => ExpertMode::Resident,
            Placement::OnDemand(_) => ExpertMode::OnDemand(StoreConfig {
                budget_bytes: total,
                ..StoreConfig::default()
            }),
        };
        let options = LoadOptions {
            experts,
            context_length: self.context_length(),
            ..LoadOptions::default()
        };
        // Two models may not fit in memory together: the old one goes first,
        // and its memory back to the system before the new one is measured.
        self.unload();
        let loaded = loader::load(path, &options, &device)
            .map_err(|error| invalid(format!("cannot load {}: {error}", path.display())))?;
        self.epoch += 1;
        let budget_bytes = match (placement, &loaded.store) {
            (Placement::OnDemand(kind), Some(store)) => {
                let start = self.pressure.model_loaded(ModelMemory {
                    epoch: self.epoch,
                    total_expert_bytes: total,
                    expert_bytes: store.expert_bytes(),
                    experts_per_token: config.num_experts_per_token as u64,
                    layers: config.num_layers as u64,
                    base_bytes: resident_bytes().unwrap_or(0),
                    budget: kind,
                });
                store.set_budget(start);
                Some(start)
            }
            _ => None,
        };
        let info = ModelInfo {
            path: path.display().to_string(),
            architecture: config.architecture.model_type().to_owned(),
            layers: config.num_layers as u32,
            experts_per_layer: config.num_experts as u32,
            experts_per_token: config.num_experts_per_token as u32,
            // As the store counts them: GGUF experts at their stored size, others in f32.
            expert_bytes: total / (config.num_layers * config.num_experts).max(1) as u64,
            total_expert_bytes: total,
            mode: if dense {
                "dense"
            } else if budget_bytes.is_some() {
                "on_demand"
            } else {
                "resident"
            }
            .to_owned(),
            budget_bytes,
            unloads_in_s: None,
        };
        info!(
            model = %path.display(),
            architecture = %info.architecture,
            mode = %info.mode,
            budget = %budget,
            budget_bytes = budget_bytes.unwrap_or(total),
            expert_bytes = total,
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        let served = Served {
            epoch: self.epoch,
            info: info.clone(),
            vocab_size: config.vocab_size,
            context_length: loaded.model.context_length(),
            tokenizer: loaded.tokenizer.clone(),
            store: loaded.store.clone(),
        };
        self.loaded = Some(loaded);
        self.publish(Some(Arc::new(served)));
        self.keep_alive(None);
        Ok(info)
    }

    /// Starts the loaded model's idle time: it is unloaded after `keep_alive`,
    /// else after the configured `model.keep_alive`.
    fn keep_alive(&mut self, keep_alive: Option<KeepAlive>) {
        let keep_alive = keep_alive.unwrap_or_else(|| {
            self.settings
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .keep_alive
        });
        self.unload_at = match keep_alive {
            KeepAlive::Forever => None,
            KeepAlive::For(idle) => Some(Instant::now() + idle),
        };
        *lock(&self.shared.unload_at) = self.unload_at;
    }

    /// Gives the loaded store the directive's budget; under critical pressure,
    /// drops the kept sessions too.
    fn apply(&mut self, directive: Directive) {
        if directive.epoch != self.epoch {
            return;
        }
        if let Some(store) = self
            .loaded
            .as_ref()
            .and_then(|loaded| loaded.store.as_ref())
        {
            set_budget(store, &directive);
        }
        if directive.relieve {
            self.relieve();
        }
    }

    /// Critical memory pressure: drops every kept (idle) session's KV cache
    /// and gives the freed memory back.
    fn relieve(&mut self) {
        let stats = self.sessions.stats();
        if stats.count > 0 {
            self.sessions.clear();
            self.publish_sessions();
            info!(
                sessions = stats.count,
                kv_bytes = stats.kv_bytes,
                "critical memory pressure: idle sessions dropped"
            );
        }
        return_freed_memory();
    }

    /// Drops the model and its sessions, giving their memory back to the
    /// system; true if one was loaded.
    fn unload(&mut self) -> bool {
        self.pressure.model_unloaded();
        self.publish(None);
        self.sessions.clear();
        self.publish_sessions();
        let unloaded = self.loaded.take().is_some();
        self.unload_at = None;
        *lock(&self.shared.unload_at) = None;
        return_freed_memory();
        unloaded
    }

    fn publish(&self, served: Option<Arc<Served>>) {
        *self
            .shared
            .served
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = served;
    }

    fn publish_sessions(&self) {
        *lock(&self.shared.sessions) = self.sessions.stats();
    }
}

/// Gives `store` the directive's budget; a smaller one evicts unpinned
/// experts at once, and the memory they held goes back to the system.
fn set_budget(store: &ExpertStore, directive: &Directive) {
    let before = store.stats().budget_bytes;
    store.set_budget(directive.budget);
    debug!(
        from = before,
        to = directive.budget,
        "expert budget applied"
    );
    if directive.budget < before {
        return_freed_memory();
    }
}

/// The prompt of a `chat` turn: the whole `conversation` rendered with the
/// chat template, and the request's length fitted to the context when the
/// client left it to the default.
///
/// A conversation that has outgrown the context drops its oldest turns (the
/// system message stays) until the prompt fits with room for the reply, as a
/// chat that goes on for long would otherwise fail at every turn; the turn
/// being asked is never dropped. Returns how many messages went.
///
/// A prompt computed again after trimming costs the whole prompt's attention
/// at once until long-context prefill lands, hence trimming to well below the
/// limit rather than to just under it.
fn render_turn(
    loaded: &LoadedModel,
    conversation: &mut Vec<ChatMessage>,
    turn: &ChatTurn,
    request: &GenerateRequest,
) -> Result<(GenerateRequest, usize), RpcError> {
    let tokenizer = loaded
        .tokenizer
        .as_deref()
        .ok_or_else(|| RpcError::new(ErrorCode::InvalidParams, "the model has no tokenizer"))?;
    let context = loaded.model.context_length();
    // The reply needs room too: what was asked, or with the default a quarter
    // of the context at most.
    let reply = if turn.fit_max_tokens {
        request.max_tokens.min(context / 4).max(1)
    } else {
        request.max_tokens
    };
    let encode = |conversation: &[ChatMessage]| {
        tokenizer
            .encode_chat(conversation)
            .map_err(|error| RpcError::new(ErrorCode::InvalidParams, format!("messages: {error}")))
    };
    let mut prompt = encode(conversation)?;
    let mut dropped = 0;
    let kept_first = usize::from(conversation.first().is_some_and(|m| m.role == "system"));
    // Once it must trim, it trims to three quarters of the context: the prompt
    // is then computed again from the first changed token, and that should not
    // happen at every turn.
    let target = if prompt.len() + reply > context {
        context * 3 / 4
    } else {
        context
    };
    while prompt.len() + reply > target && conversation.len() > kept_first + turn.messages.len() {
        conversation.remove(kept_first);
        dropped += 1;
        prompt = encode(conversation)?;
    }
    if dropped > 0 {
        debug!(dropped, "conversation trimmed to fit the context");
    }
    let mut request = request.clone();
    if turn.fit_max_tokens {
        let room = context.saturating_sub(prompt.len());
        request.max_tokens = request.max_tokens.min(room.max(1));
    }
    request.prompt = prompt;
    Ok((request, dropped))
}

/// A named conversation: its KV cache and tokens, the chat messages it holds
/// (for `chat`), and when it was last used.
struct Kept {
    session: Session,
    conversation: Vec<ChatMessage>,
    used: Instant,
}

/// Kept sessions by name.
#[derive(Default)]
struct Sessions {
    kept: HashMap<String, Kept>,
}

impl Sessions {
    fn take(&mut self, name: &str) -> Option<(Session, Vec<ChatMessage>)> {
        self.kept
            .remove(name)
            .map(|kept| (kept.session, kept.conversation))
    }

    /// Keeps `session` as just used, dropping the least recently used ones
    /// beyond `max`.
    fn put(&mut self, name: String, session: Session, conversation: Vec<ChatMessage>, max: usize) {
        let kept = Kept {
            session,
            conversation,
            used: Instant::now(),
        };
        self.kept.insert(name, kept);
        self.trim(max);
    }

    /// Drops the least recently used sessions beyond `max`; returns how many.
    fn trim(&mut self, max: usize) -> usize {
        let mut dropped = 0;
        while self.kept.len() > max {
            let oldest = self
                .kept
                .iter()
                .min_by_key(|(_, kept)| kept.used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                debug!(session = %oldest, "session dropped: too many sessions");
                self.kept.remove(&oldest);
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops sessions unused for `idle`; returns how many.
    fn expire(&mut self, idle: Option<Duration>) -> usize {
        let Some(idle) = idle else { return 0 };
        let before = self.kept.len();
        self.kept.retain(|name, kept| {
            let keep = kept.used.elapsed() < idle;
            if !keep {
                debug!(session = %name, "session dropped: idle");
            }
            keep
        });
        before - self.kept.len()
    }

    /// When the next session becomes idle for `idle`.
    fn next_expiry(&self, idle: Option<Duration>) -> Option<Instant> {
        let idle = idle?;
        self.kept.values().map(|kept| kept.used + idle).min()
    }

    fn clear(&mut self) {
        self.kept.clear();
    }

    fn stats(&self) -> SessionStats {
        SessionStats {
            count: u32::try_from(self.kept.len()).unwrap_or(u32::MAX),
            kv_bytes: self
                .kept
                .values()
                .map(|kept| kept.session.cache_bytes() as u64)
                .sum(),
        }
    }
}

/// The answer to a generation cancelled before it ran.
fn cancelled_before_start(job: &GenerateJob, queued: Instant) -> GenerateResult {
    GenerateResult {
        text: String::new(),
        tokens: Vec::new(),
        finish_reason: "cancelled".into(),
        usage: Usage {
            prompt_tokens: u32::try_from(job.request.prompt.len()).unwrap_or(u32::MAX),
            completion_tokens: 0,
            cached_tokens: 0,
        },
        timings: Timings {
            queue_ms: queued.elapsed().as_secs_f64() * 1e3,
            prefill_ms: 0.0,
            decode_ms: 0.0,
        },
    }
}

fn result_of(generation: Generation, queue_ms: f64) -> GenerateResult {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    GenerateResult {
        finish_reason: match generation.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
        .into(),
        usage: Usage {
            prompt_tokens: count(generation.prompt_tokens),
            completion_tokens: count(generation.tokens.len()),
            cached_tokens: count(generation.cached_tokens),
        },
        timings: Timings {
            queue_ms,
            prefill_ms: generation.timings.prefill_ms,
            decode_ms: generation.timings.decode_ms,
        },
        text: generation.text,
        tokens: generation.tokens,
    }
}

/// The engine's error as an answer: the caller's fault for bad requests,
/// the daemon's otherwise.
pub fn engine_error(error: odmoe_engine::Error) -> RpcError {
    match error {
        odmoe_engine::Error::InvalidRequest(message) => {
            RpcError::new(ErrorCode::InvalidParams, message)
        }
        odmoe_engine::Error::ContextLengthExceeded(message) => {
            RpcError::new(ErrorCode::ContextLengthExceeded, message)
        }
        other => RpcError::new(ErrorCode::Internal, other.to_string()),
    }
}

/// The answer when no model is loaded.
pub fn no_model() -> RpcError {
    RpcError::new(
        ErrorCode::NoModel,
        "no model is loaded: start odmoed with --model PATH or call `load`",
    )
}

fn engine_gone() -> RpcError {
    RpcError::new(ErrorCode::Internal, "the engine thread has stopped")
}
