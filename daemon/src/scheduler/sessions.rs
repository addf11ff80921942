//! Kept sessions (named conversations with their KV caches) and the prompt
//! of a chat turn that continues one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use odmoe_engine::generate::{GenerateRequest, Session};
use odmoe_engine::open::LoadedModel;
use odmoe_engine::tokenizer::ChatMessage;
use tracing::debug;

use super::{ChatTurn, SchedulerError, SessionsKept};

/// A named conversation: its KV cache and tokens, the chat messages it holds
/// (for `chat`), and when it was last used.
struct Kept {
    session: Session,
    conversation: Vec<ChatMessage>,
    used: Instant,
}

/// Kept sessions by name.
#[derive(Default)]
pub(super) struct Sessions {
    kept: HashMap<String, Kept>,
}

impl Sessions {
    pub(super) fn take(&mut self, name: &str) -> Option<(Session, Vec<ChatMessage>)> {
        self.kept
            .remove(name)
            .map(|kept| (kept.session, kept.conversation))
    }

    /// Keeps `session` as just used, dropping the least recently used ones
    /// beyond `max`.
    pub(super) fn put(
        &mut self,
        name: String,
        session: Session,
        conversation: Vec<ChatMessage>,
        max: usize,
    ) {
        let kept = Kept {
            session,
            conversation,
            used: Instant::now(),
        };
        self.kept.insert(name, kept);
        self.trim(max);
    }

    /// Drops the least recently used sessions beyond `max`; returns how many.
    pub(super) fn trim(&mut self, max: usize) -> usize {
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
    pub(super) fn expire(&mut self, idle: Option<Duration>) -> usize {
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
    pub(super) fn next_expiry(&self, idle: Option<Duration>) -> Option<Instant> {
        let idle = idle?;
        self.kept.values().map(|kept| kept.used + idle).min()
    }

    pub(super) fn clear(&mut self) {
        self.kept.clear();
    }

    pub(super) fn stats(&self) -> SessionsKept {
        SessionsKept {
            count: self.kept.len(),
            kv_bytes: self
                .kept
                .values()
                .map(|kept| kept.session.cache_bytes() as u64)
                .sum(),
            ..SessionsKept::default()
        }
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
pub(super) fn render_turn(
    loaded: &LoadedModel,
    conversation: &mut Vec<ChatMessage>,
    turn: &ChatTurn,
    request: &GenerateRequest,
) -> Result<(GenerateRequest, usize), SchedulerError> {
    let tokenizer = loaded
        .tokenizer
        .as_deref()
        .ok_or_else(|| SchedulerError::Invalid("the model has no tokenizer".into()))?;
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
            .map_err(|error| SchedulerError::Invalid(format!("messages: {error}")))
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
