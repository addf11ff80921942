//! The engine thread's loop: it takes jobs from the queue one at a time,
//! generates, loads and unloads models, and applies the memory controller's
//! budget between two tokens.

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use odmoe_config::{KeepAlive, KvCache, Prefetch};
use odmoe_engine::generate::Session;
use odmoe_engine::lock::recover;
use odmoe_engine::model::KvType;
use odmoe_engine::open::{self, ExpertMode, LoadOptions, LoadedModel};
use odmoe_engine::predict::PredictorKind;
use odmoe_engine::store::{ExpertStore, StoreConfig};
use odmoe_engine::tokenizer::ChatMessage;
use tracing::{debug, error, info, warn};

use super::job::{Job, cancelled_before_start};
use super::prefixes::Prefixes;
use super::sessions::{Sessions, render_turn};
use super::{
    Event, Finished, GenerateJob, ModelDescription, ModelMode, SchedulerError, Served,
    SessionsKept, Shared, lock,
};
use crate::budget::{BudgetKind, BudgetSpec, Placement};
use crate::memory::{resident_bytes, return_freed_memory};
use crate::pressure::{Directive, ModelMemory, Pressure};
use crate::settings::Settings;

/// Longest the engine thread sleeps without looking at idle sessions, so a
/// changed `idle_expiry_secs` takes effect soon.
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// What the engine thread owns.
pub(super) struct Engine {
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
    /// KV caches of requests without a session, by their tokens.
    prefixes: Prefixes,
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
    /// The engine of `shared`, with no model loaded yet.
    pub(super) fn new(
        shared: Arc<Shared>,
        settings: Arc<RwLock<Settings>>,
        pressure: Arc<Pressure>,
    ) -> Engine {
        Engine {
            shared,
            settings,
            loaded: None,
            unload_at: None,
            sessions: Sessions::default(),
            prefixes: Prefixes::default(),
            epoch: 0,
            pressure,
        }
    }

    /// Serves the queue until the scheduler stops.
    pub(super) fn run(mut self) {
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

    /// The live settings (a reloaded config may change some between requests).
    fn settings(&self) -> std::sync::RwLockReadGuard<'_, Settings> {
        recover(self.settings.read())
    }

    fn idle_expiry(&self) -> Option<Duration> {
        let settings = self.settings();
        let secs = settings.sessions.idle_expiry_secs;
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    fn context_length(&self) -> Option<usize> {
        self.settings().context_length
    }

    fn kv_cache(&self) -> KvCache {
        self.settings().kv_cache
    }

    fn prefill_slab(&self) -> usize {
        self.settings()
            .prefill_slab
            .unwrap_or(odmoe_engine::model::DEFAULT_PREFILL_SLAB)
    }

    fn prefix_cache_bytes(&self) -> u64 {
        self.settings().sessions.prefix_cache_bytes
    }

    fn max_sessions(&self) -> usize {
        let settings = self.settings();
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
            // Idle: the large blocks the last request freed go back to the system.
            odmoe_engine::allocator::give_back();
            let wait = until.map_or(IDLE_CHECK, |until| {
                until
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_CHECK)
            });
            if wait.is_zero() {
                break;
            }
            queue = recover(self.shared.wake.wait_timeout(queue, wait)).0;
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

    fn generate(&mut self, job: &GenerateJob, queued: Instant) -> Result<Finished, SchedulerError> {
        let queue_ms = queued.elapsed().as_secs_f64() * 1e3;
        if job.cancel.is_cancelled() || job.events.is_closed() {
            return Ok(cancelled_before_start(job, queued));
        }
        let Some(loaded) = &self.loaded else {
            return Err(SchedulerError::NoModel);
        };
        if job.epoch != self.epoch {
            return Err(SchedulerError::Cancelled(
                "the model was replaced while this request waited; send it again".into(),
            ));
        }
        let model = &loaded.model;
        let store = loaded.store.clone();
        let kept = match &job.session {
            Some(name) => self.sessions.take(name),
            // A chat turn without a session renders its prompt on this
            // thread: it is known only then, and goes without the cache.
            None if job.turn.is_none() => self
                .prefixes
                .take(&job.request.prompt)
                .map(|session| (session, Vec::new())),
            None => None,
        };
        let (mut session, mut conversation) =
            kept.unwrap_or_else(|| (Session::new(model), Vec::new()));
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
        // This request's cache with the idle ones: beyond the reserve, the expert budget gives
        // way before the prompt's cache is allocated.
        let upcoming = model.kv_cache_bytes(request.prompt.len() + request.max_tokens);
        self.account_kv(self.sessions_kept(), upcoming);
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
            let delivered = job.events.send(Event::Token(delta.clone())).is_ok();
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
        if let Ok(generation) = &outcome {
            info!(
                prompt_tokens = generation.prompt_tokens,
                cached_tokens = generation.cached_tokens,
                tokens = generation.tokens.len(),
                finish = ?generation.finish_reason,
                "generation done"
            );
        }
        match &job.session {
            Some(name) => {
                let max = self.max_sessions();
                self.sessions.put(name.clone(), session, conversation, max);
            }
            None => self.prefixes.put(session, self.prefix_cache_bytes()),
        }
        self.publish_sessions();
        Ok(Finished {
            generation: outcome?,
            queue_ms,
        })
    }

    fn load(
        &mut self,
        path: &Path,
        budget: &BudgetSpec,
    ) -> Result<ModelDescription, SchedulerError> {
        let invalid = SchedulerError::Invalid;
        let started = Instant::now();
        // Everything that can be checked without the weights is checked before
        // the loaded model is dropped, so a typo does not leave no model at all.
        let device = odmoe_engine::default_device()?;
        // The experts' bytes as this device will hold them.
        let (config, sizes) =
            open::expert_sizes_on(path, &device).map_err(|error| invalid(error.to_string()))?;
        let total = sizes.total(&config);
        let dense = open::is_dense(&config);
        let placement = if dense {
            Placement::Resident
        } else {
            budget.resolve(total)
        };
        if let Placement::OnDemand(BudgetKind::Fixed(bytes)) = placement {
            open::check_budget(&config, &sizes, bytes)
                .map_err(|error| invalid(format!("expert_budget: {error}")))?;
        }
        if dense {
            info!(model = %path.display(), "dense model: every weight resident, the expert budget does not apply");
        }
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
            kv_cache: match self.kv_cache() {
                KvCache::F16 => KvType::F16,
                KvCache::F32 => KvType::F32,
                KvCache::Q8_0 => KvType::Q8_0,
            },
            prefill_slab: self.prefill_slab(),
            prefetch: match self.settings().prefetch {
                Prefetch::None => PredictorKind::None,
                Prefetch::Lookahead => PredictorKind::Lookahead,
                Prefetch::History => PredictorKind::History,
            },
            ..LoadOptions::serving()
        };
        // Two models may not fit in memory together: the old one goes first,
        // and its memory back to the system before the new one is measured.
        self.unload();
        let loaded = open::load(path, &options, &device)
            .map_err(|error| invalid(format!("cannot load {}: {error}", path.display())))?;
        self.epoch += 1;
        // The tokenizer's working memory belongs to the base the budget is sized from.
        if let Some(tokenizer) = &loaded.tokenizer {
            tokenizer.warm_up();
        }
        let budget_bytes = match (placement, &loaded.store) {
            (Placement::OnDemand(kind), Some(store)) => {
                let start = self.pressure.model_loaded(ModelMemory {
                    epoch: self.epoch,
                    total_expert_bytes: total,
                    expert_bytes: store.expert_sizes().largest(),
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
        let info = ModelDescription {
            path: path.to_owned(),
            architecture: odmoe_engine::model::model_type(config.architecture).to_owned(),
            layers: config.num_layers,
            experts_per_layer: config.num_experts,
            experts_per_token: config.num_experts_per_token,
            // As the store counts them on this device: quantized experts at their held size,
            // float ones in f32; the mean over the layers that have experts.
            expert_bytes: sizes.mean(&config),
            total_expert_bytes: total,
            mode: if dense {
                ModelMode::Dense
            } else if budget_bytes.is_some() {
                ModelMode::OnDemand
            } else {
                ModelMode::Resident
            },
            budget_bytes,
        };
        info!(
            model = %path.display(),
            architecture = %info.architecture,
            mode = %info.mode,
            budget = %budget,
            budget_bytes = budget_bytes.unwrap_or(total),
            total_expert_bytes = total,
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
        let keep_alive = keep_alive.unwrap_or_else(|| recover(self.settings.read()).keep_alive);
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
        let stats = self.sessions_kept();
        if stats.count + stats.prefixes > 0 {
            self.sessions.clear();
            self.prefixes.clear();
            self.publish_sessions();
            info!(
                sessions = stats.count,
                kv_bytes = stats.kv_bytes,
                prefixes = stats.prefixes,
                prefix_bytes = stats.prefix_bytes,
                "critical memory pressure: idle sessions and the prefix cache dropped"
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
        self.prefixes.clear();
        self.publish_sessions();
        let unloaded = self.loaded.take().is_some();
        self.unload_at = None;
        *lock(&self.shared.unload_at) = None;
        return_freed_memory();
        unloaded
    }

    fn publish(&self, served: Option<Arc<Served>>) {
        *recover(self.shared.served.write()) = served;
    }

    fn publish_sessions(&self) {
        let kept = self.sessions_kept();
        *lock(&self.shared.sessions) = kept;
        self.account_kv(kept, 0);
    }

    /// Tells the memory controller what the KV caches hold (the idle ones, `kept`, and
    /// `running`, a request's own), and applies the budget it gives back, if it moved.
    fn account_kv(&self, kept: SessionsKept, running: u64) {
        let bytes = kept.kv_bytes + kept.prefix_bytes + running;
        let store = self.loaded.as_ref().and_then(|l| l.store.as_deref());
        if let (Some(directive), Some(store)) = (self.pressure.kv_cache_bytes(bytes), store) {
            set_budget(store, &directive);
        }
    }

    fn sessions_kept(&self) -> SessionsKept {
        SessionsKept {
            prefixes: self.prefixes.count(),
            prefix_bytes: self.prefixes.bytes(),
            ..self.sessions.stats()
        }
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
