//! The work handed to the engine thread, and what it answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use odmoe_config::KeepAlive;
use odmoe_engine::generate::{Delta, FinishReason, GenerateRequest, Generation, Timings};
use odmoe_engine::tokenizer::ChatMessage;
use tokio::sync::{mpsc, oneshot};

use super::ModelDescription;
use crate::budget::BudgetSpec;

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
    /// Text that became final, and with which token.
    Token(Delta),
    /// The end: the result, or why there is none.
    Done(Result<Finished, SchedulerError>),
}

/// A generation that ended, and how long it waited in the queue.
#[derive(Debug)]
pub struct Finished {
    /// Its tokens and text, why it stopped, and how long it computed.
    pub generation: Generation,
    /// Milliseconds between queueing and the engine taking it up.
    pub queue_ms: f64,
}

/// Why the engine thread did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// No model is loaded to generate with.
    #[error("no model is loaded: start odmoed with --model PATH or call `load`")]
    NoModel,
    /// Not run: cancelled while waiting, the daemon stopping, or its model
    /// replaced meanwhile.
    #[error("{0}")]
    Cancelled(String),
    /// The request, or the model asked to load, is at fault.
    #[error("{0}")]
    Invalid(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] odmoe_engine::Error),
    /// The engine thread is gone.
    #[error("the engine thread has stopped")]
    Stopped,
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
pub(super) enum Job {
    Generate {
        job: GenerateJob,
        /// When the job was queued, for `timings.queue_ms`.
        queued: Instant,
    },
    Load {
        path: PathBuf,
        budget: BudgetSpec,
        reply: oneshot::Sender<Result<ModelDescription, SchedulerError>>,
    },
    Unload {
        reply: oneshot::Sender<Result<bool, SchedulerError>>,
    },
}

impl Job {
    /// Answers the job without running it: the daemon is stopping or it was
    /// cancelled while waiting.
    pub(super) fn cancel(self, why: &str) {
        match self {
            Job::Generate { job, queued } => {
                let result = cancelled_before_start(&job, queued);
                let _ = job.events.send(Event::Done(Ok(result)));
            }
            Job::Load { reply, .. } => {
                let _ = reply.send(Err(SchedulerError::Cancelled(why.to_owned())));
            }
            Job::Unload { reply } => {
                let _ = reply.send(Err(SchedulerError::Cancelled(why.to_owned())));
            }
        }
    }
}

/// The answer to a generation cancelled before it ran.
pub(super) fn cancelled_before_start(job: &GenerateJob, queued: Instant) -> Finished {
    Finished {
        generation: Generation {
            tokens: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Cancelled,
            prompt_tokens: job.request.prompt.len(),
            cached_tokens: 0,
            timings: Timings::default(),
        },
        queue_ms: queued.elapsed().as_secs_f64() * 1e3,
    }
}
