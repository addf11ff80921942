//! How many guesses are read at once: one while guesses are often wrong, several while they
//! are nearly always right.
//!
//! One guess at a time keeps wrong guesses cheap: the guesses after the first are mostly
//! cancelled before they start (see `GUESS_THREADS` in the store). But one read at a time, in
//! pieces, cannot keep this disk busy: with every guess right (`odmoe bench decode
//! --prefetch-from-trace`, four layers ahead, skewed 18-layer qwen3moe at a 2 GB limit), one at
//! a time decoded 1.05x as fast as no prefetch, four at once 1.3-1.5x. So the width follows
//! the guesses' record: each guess is judged once, right when a layer asks for it (read, being
//! read or still queued), wrong when its layer's routing passes it over or it is evicted
//! unused, and the share of right ones, averaged over about the last [`WINDOW`] guesses, widens
//! the reads to [`WIDEST`] at [`WIDEN_AT`] and narrows them to one below [`NARROW_BELOW`].
//! Lookahead's guesses on that model are right about half the time, and stay one at a time.

use super::fetch;

/// Most guesses read at once; the store starts this many guess threads.
pub const WIDEST: usize = 4;

/// Guesses the share of right ones is averaged over (an exponential average).
const WINDOW: f64 = 64.0;

/// Share of right guesses at which reads widen.
const WIDEN_AT: f64 = 0.9;

/// Share of right guesses under which they narrow again: below the widening share, so that a
/// share near it does not switch at every guess.
const NARROW_BELOW: f64 = 0.8;

/// The guesses' record and the width it gives.
#[derive(Debug)]
pub struct GuessWidth {
    right_share: f64,
    wide: bool,
}

impl Default for GuessWidth {
    /// No record yet: one at a time, and half of the guesses taken as right, so that about a
    /// window of right guesses widens the reads.
    fn default() -> Self {
        Self {
            right_share: 0.5,
            wide: false,
        }
    }
}

impl GuessWidth {
    /// Judges one guess.
    pub fn record(&mut self, right: bool) {
        let value = if right { 1.0 } else { 0.0 };
        self.right_share += (value - self.right_share) / WINDOW;
        if self.right_share >= WIDEN_AT {
            self.wide = true;
        } else if self.right_share < NARROW_BELOW {
            self.wide = false;
        }
    }

    /// Whether several guesses may be read at once now.
    pub fn is_wide(&self) -> bool {
        self.wide
    }

    /// Guesses that may be read at once now.
    pub fn reads(&self) -> usize {
        if self.wide { WIDEST } else { 1 }
    }

    /// Bytes a guess's read takes before its next question: larger while wide, when misses
    /// are rare.
    pub fn piece(&self) -> usize {
        if self.wide {
            fetch::WIDE_PIECE
        } else {
            fetch::PIECE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_widen_after_a_run_of_right_guesses_and_narrow_after_wrong_ones() {
        let mut width = GuessWidth::default();
        assert_eq!(width.reads(), 1);
        // Half right, as lookahead's on the skewed model: never wide.
        for i in 0..1000 {
            width.record(i % 2 == 0);
            assert_eq!(width.reads(), 1, "guess {i}");
        }
        // Every guess right: wide within a few dozen guesses.
        let mut widened_after = None;
        for i in 0..200 {
            width.record(true);
            if width.reads() == WIDEST {
                widened_after = Some(i + 1);
                break;
            }
        }
        let widened_after = widened_after.expect("right guesses widen the reads");
        assert_eq!(width.piece(), fetch::WIDE_PIECE);
        assert!(
            (32..=128).contains(&widened_after),
            "widened after {widened_after}"
        );
        // One wrong guess in ten keeps it wide (between the two shares)...
        for i in 0..300 {
            width.record(i % 10 != 0);
            assert_eq!(width.reads(), WIDEST, "guess {i}");
        }
        // ...three in ten narrow it.
        for _ in 0..300 {
            width.record(false);
            width.record(true);
            width.record(true);
            width.record(false);
            width.record(true);
            width.record(true);
            width.record(true);
            width.record(false);
            width.record(true);
            width.record(true);
        }
        assert_eq!(width.reads(), 1);
        assert_eq!(width.piece(), fetch::PIECE);
    }
}
