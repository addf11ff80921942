//! The prefix cache: KV caches of requests without a session, kept by their
//! tokens, so a request that starts like an earlier one computes only what is
//! new. Stateless APIs (OpenAI's, Anthropic's) send the whole conversation at
//! every turn: without this, every turn would compute the whole history again.

use odmoe_engine::generate::Session;
use tracing::debug;

/// Fewest tokens a kept cache must share with a prompt to be worth taking:
/// below that, a fresh cache costs the same and keeps the kept one for a
/// request that shares more.
const MIN_SHARED: usize = 16;

/// Kept caches, least recently used first.
#[derive(Default)]
pub(super) struct Prefixes {
    kept: Vec<Session>,
}

impl Prefixes {
    /// Takes the kept cache sharing the longest start with `prompt`, if any
    /// shares at least [`MIN_SHARED`] tokens (or the whole prompt).
    pub(super) fn take(&mut self, prompt: &[u32]) -> Option<Session> {
        let (best, shared) = self
            .kept
            .iter()
            .enumerate()
            .map(|(index, session)| (index, session.shared_with(prompt)))
            .max_by_key(|&(index, shared)| (shared, index))?;
        if shared < MIN_SHARED.min(prompt.len()) || shared == 0 {
            return None;
        }
        debug!(shared, "prefix cache hit");
        Some(self.kept.remove(best))
    }

    /// Keeps `session` as the most recently used, then drops the least
    /// recently used caches until all fit in `max_bytes` (0 keeps none).
    pub(super) fn put(&mut self, session: Session, max_bytes: u64) {
        if !session.tokens().is_empty() {
            // A kept cache whose tokens this one starts with holds nothing this one lacks.
            self.kept
                .retain(|kept| !session.tokens().starts_with(kept.tokens()));
            self.kept.push(session);
        }
        while self.bytes() > max_bytes && !self.kept.is_empty() {
            let dropped = self.kept.remove(0);
            debug!(
                tokens = dropped.tokens().len(),
                "prefix cache entry dropped: over prefix_cache_bytes"
            );
        }
    }

    pub(super) fn clear(&mut self) {
        self.kept.clear();
    }

    pub(super) fn count(&self) -> usize {
        self.kept.len()
    }

    pub(super) fn bytes(&self) -> u64 {
        self.kept
            .iter()
            .map(|session| session.cache_bytes() as u64)
            .sum()
    }
}
