//! Prefill and decode: a [`Session`] owns a KV cache and the tokens it holds, so a follow-up
//! request reuses the longest common prefix; a [`Sampler`] picks tokens; stop strings are matched
//! on the text without ever emitting part of a stop string.

use std::time::Instant;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{KvCache, Logits, Model, readback};
use crate::tokenizer::reasoning::Part;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// How the next token is chosen. Applied in the order repetition penalty, temperature, top-k,
/// top-p, min-p (the order of Hugging Face's logits processors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen; 1 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidRequest(what.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(&format!(
                "temperature: must be 0 or more, got {}",
                self.temperature
            ));
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad(&format!("top_p: must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(&format!("min_p: must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(&format!(
                "repetition_penalty: must be more than 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Picks tokens from logits, reproducibly for a given seed.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// Chooses the next token given the logits and the tokens seen so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return crate::model::layers::argmax(&logits) as u32;
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            candidates.truncate(p.top_k);
        }
        // The largest logit is taken off before dividing by the temperature: a tiny temperature
        // then sends the others to -inf (probability 0) instead of overflowing to inf - inf.
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|&(_, l)| ((l - max) / p.temperature).exp())
            .collect();
        normalise(&mut probs);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    cumulative += q;
                    cumulative >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let threshold = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&q| q >= threshold).count().max(1);
            probs.truncate(keep);
        }
        normalise(&mut probs);
        let draw: f32 = self.rng.random();
        let mut cumulative = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            cumulative += q;
            if draw < cumulative {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

fn normalise(probs: &mut [f32]) {
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= sum);
}

/// One generation request against a session.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends the generation; it is not part of the returned text.
    pub stop: Vec<String>,
    /// Token ids that end the generation in addition to the tokenizer's end-of-sequence ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens (for reference comparisons).
    pub ignore_eos: bool,
    /// What the prompt asks for, which decides what the text is and where stop strings are
    /// looked for.
    pub reply: ReplyForm,
}

/// What a prompt asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyForm {
    /// Text after the prompt: all of it is text, and stop strings are looked for in all of it.
    #[default]
    Completion,
    /// The assistant's reply to a chat: when the chat template marks the reply's parts (gpt-oss's
    /// Harmony channels, `<think>` tags), stop strings are looked for in its answer only, never
    /// in its reasoning, calls or markers. All of them are text, for a caller that divides them
    /// itself (the HTTP APIs).
    Chat,
    /// As [`ReplyForm::Chat`], with only the answer as text: the reasoning, calls and markers
    /// are left out of it (their tokens are still returned).
    ChatAnswer,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            reply: ReplyForm::Completion,
        }
    }
}

/// Refuses a prompt of `prompt_tokens` that, with `max_tokens` generated after it, would not
/// fit a context of `context_length` positions; checked before any compute.
pub fn check_context(context_length: usize, prompt_tokens: usize, max_tokens: usize) -> Result<()> {
    if prompt_tokens.saturating_add(max_tokens) <= context_length {
        return Ok(());
    }
    Err(Error::ContextLengthExceeded(
        if prompt_tokens >= context_length {
            format!(
                "the prompt has {prompt_tokens} tokens: the context length is {context_length} tokens"
            )
        } else {
            format!(
                "the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together \
             {} tokens, past the context length of {context_length}; lower max_tokens to at \
             most {}",
                prompt_tokens + max_tokens,
                context_length - prompt_tokens
            )
        },
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// What the caller sees while generating.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub token: u32,
    /// Text that became final with this token (may be empty while a character or a possible stop
    /// string is incomplete).
    pub text: String,
    /// No new token: `text` was held back (mid-character, or as it could begin a stop string)
    /// and is released with the last token again, at the end of the reply or, for a chat, just
    /// before a token of another part of it (the answer's tail before a marker or reasoning).
    pub again: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV entries were reused from the session instead of recomputed.
    pub cached_tokens: usize,
    pub timings: Timings,
}

/// A conversation's KV cache and the tokens it holds.
pub struct Session {
    cache: KvCache,
    tokens: Vec<u32>,
}

impl Session {
    pub fn new(model: &Model) -> Self {
        Self {
            cache: model.new_cache(),
            tokens: Vec::new(),
        }
    }

    /// Tokens whose keys and values are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// How many tokens the cache holds that `prompt` starts with and can go on from (see
    /// [`KvCache::reusable`]): what a prefill of `prompt` reuses (all but the last prompt
    /// token, at most).
    pub fn shared_with(&self, prompt: &[u32]) -> usize {
        self.cache.reusable(self.common_prefix(prompt))
    }

    /// How many tokens the cache holds that `prompt` starts with.
    fn common_prefix(&self, prompt: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Brings the cache to `prompt`, reusing the longest common prefix, and returns the logits of
    /// the last prompt position and how many prompt tokens were reused.
    pub fn prefill(&mut self, model: &Model, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        // At least one token must run to produce logits.
        let reused = self
            .cache
            .reusable(self.common_prefix(prompt).min(prompt.len() - 1));
        self.cache.truncate(reused)?;
        self.tokens.truncate(reused);
        let logits = self.run(model, &prompt[reused..])?;
        Ok((logits, reused))
    }

    /// Runs `tokens` after the cached ones, in slabs of at most the model's prefill slab, and
    /// returns the logits of the last.
    fn run(&mut self, model: &Model, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut last = None;
        for slab in tokens.chunks(model.prefill_slab()) {
            match model.forward(slab, &mut self.cache, Logits::Last, None) {
                Ok(logits) => {
                    self.tokens.extend_from_slice(slab);
                    last = Some(logits);
                }
                Err(e) => {
                    // A failed step may have cached some layers: forget everything after the
                    // last consistent state so the session stays usable.
                    self.cache.truncate(0)?;
                    self.tokens.clear();
                    return Err(e);
                }
            }
        }
        let logits = last.ok_or_else(|| Error::InvalidRequest("no tokens to run".into()))?;
        Ok(readback::rows(&[&logits])?.remove(0).remove(0))
    }

    /// Generates after `request.prompt`, calling `on_delta` for every token; returning false from
    /// it cancels the generation.
    pub fn generate(
        &mut self,
        model: &Model,
        tokenizer: Option<&Tokenizer>,
        request: &GenerateRequest,
        mut on_delta: impl FnMut(&Delta) -> bool,
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(request.sampling.clone())?;
        let mut stop_ids: Vec<u32> = request.stop_token_ids.clone();
        if !request.ignore_eos {
            stop_ids.extend(model.config.eos_token_ids.iter().copied());
            stop_ids.extend(
                tokenizer
                    .map(|t| t.eos_token_ids().to_vec())
                    .unwrap_or_default(),
            );
        }
        if !request.stop.is_empty() && tokenizer.is_none() {
            return Err(Error::InvalidRequest(
                "stop strings need a tokenizer".into(),
            ));
        }
        check_context(
            model.context_length(),
            request.prompt.len(),
            request.max_tokens,
        )?;
        // The cache takes the whole sequence at once rather than doubling as it fills.
        self.cache
            .reserve((request.prompt.len() + request.max_tokens).min(model.context_length()));
        let started = Instant::now();
        let (mut logits, cached_tokens) = self.prefill(model, &request.prompt)?;
        let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
        let decode_started = Instant::now();
        let mut stream = tokenizer.map(|t| DecodeStream::new(t, true));
        // A chat reply's parts, where they matter: for the text, or for where stops are sought.
        let answer_only = request.reply == ReplyForm::ChatAnswer;
        let mut parts = tokenizer
            .filter(|_| answer_only || request.reply == ReplyForm::Chat && !request.stop.is_empty())
            .and_then(|t| Some((t, t.reply_parts(&request.prompt)?)));
        let mut stops = StopMatcher::new(&request.stop);
        // What the last token was part of, which the decoder's last bytes are too.
        let mut last_part = Part::Answer;
        let mut tokens = Vec::new();
        let mut finish_reason = FinishReason::Length;
        while tokens.len() < request.max_tokens {
            let token = sampler.sample(&logits, &self.tokens);
            if stop_ids.contains(&token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            tokens.push(token);
            let piece = match stream.as_mut() {
                Some(s) => s.step(token)?.unwrap_or_default(),
                None => String::new(),
            };
            let (released, text, stopped) = match parts.as_mut() {
                Some((tokenizer, parts)) => {
                    let (part, answer) = parts.take(&tokenizer.decode(&[token], false)?, &piece);
                    last_part = part;
                    stops.take_part(part, &piece, answer, answer_only)
                }
                None => {
                    let (text, stopped) = stops.push(&piece);
                    (String::new(), text, stopped)
                }
            };
            // Text of the earlier tokens' part goes out apart, so that a caller dividing the
            // reply by tokens files it with them.
            let before = tokens.iter().rev().nth(1).copied().unwrap_or(token);
            let released = Delta {
                token: before,
                text: released,
                again: true,
            };
            let delta = Delta {
                token,
                text,
                again: false,
            };
            let cancelled =
                (!released.text.is_empty() && !on_delta(&released)) || !on_delta(&delta);
            if cancelled {
                finish_reason = FinishReason::Cancelled;
                break;
            }
            if stopped {
                finish_reason = FinishReason::Stop;
                break;
            }
            if tokens.len() < request.max_tokens {
                logits = self.run(model, &[token])?;
            }
        }
        if finish_reason != FinishReason::Stop || !stops.stopped() {
            let rest = match stream.as_mut() {
                Some(s) => s.flush()?.unwrap_or_default(),
                None => String::new(),
            };
            let mut text = if parts.is_some() {
                let (released, text, _) = stops.take_part(last_part, &rest, &rest, answer_only);
                released + &text
            } else {
                stops.push(&rest).0
            };
            text.push_str(&stops.finish());
            if !text.is_empty() {
                on_delta(&Delta {
                    token: *tokens.last().unwrap_or(&0),
                    text,
                    again: true,
                });
            }
        }
        let text = stops.into_text();
        Ok(Generation {
            tokens,
            text,
            finish_reason,
            prompt_tokens: request.prompt.len(),
            cached_tokens,
            timings: Timings {
                prefill_ms,
                decode_ms: decode_started.elapsed().as_secs_f64() * 1e3,
            },
        })
    }
}

/// Finds stop strings in generated text, holding back any tail that could begin one.
struct StopMatcher<'a> {
    stops: &'a [String],
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Where stop strings are looked for from: after the last text passed through unsearched.
    searched_from: usize,
    stopped: bool,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            text: String::new(),
            emitted: 0,
            searched_from: 0,
            stopped: false,
        }
    }

    /// Appends `piece`, text in which no stop string is looked for (a chat reply's reasoning,
    /// calls or markers), nor across it; returns what was held back before it, which can no
    /// longer begin a stop string, and the piece.
    fn pass(&mut self, piece: &str) -> (String, String) {
        if self.stopped {
            return (String::new(), String::new());
        }
        let held = self.finish();
        self.text.push_str(piece);
        self.searched_from = self.text.len();
        (held, self.finish())
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    /// A chat reply's `piece` of `part` (`answer` the piece as the answer shows it, less the
    /// blank lines it starts without): stop strings are sought in the answer alone. With
    /// `answer_only` nothing else is text; otherwise the rest passes through unsearched.
    /// Returns the answer's text held back before a piece of another part, which that piece
    /// releases; the text now safe to show with the piece; and whether a stop string was found.
    fn take_part(
        &mut self,
        part: Part,
        piece: &str,
        answer: &str,
        answer_only: bool,
    ) -> (String, String, bool) {
        let (text, stopped) = match part {
            Part::Answer if answer_only => self.push(answer),
            Part::Answer if answer.len() < piece.len() => {
                let (held, blank) = self.pass(&piece[..piece.len() - answer.len()]);
                let (rest, stopped) = self.push(answer);
                (held + &blank + &rest, stopped)
            }
            Part::Answer => self.push(piece),
            _ if answer_only => return (self.pass("").0, String::new(), false),
            _ => {
                let (held, own) = self.pass(piece);
                return (held, own, false);
            }
        };
        (String::new(), text, stopped)
    }

    /// Appends `piece`; returns the text now safe to emit and whether a stop string was found.
    fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.text.push_str(piece);
        let searched = &self.text[self.searched_from..];
        let earliest = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| searched.find(s.as_str()))
            .min()
            .map(|at| self.searched_from + at);
        if let Some(at) = earliest {
            self.text.truncate(at);
            self.stopped = true;
            let out = self.text[self.emitted.min(at)..].to_string();
            self.emitted = at;
            return (out, true);
        }
        let safe = self.text.len() - self.held_back();
        let out = self.text[self.emitted..safe.max(self.emitted)].to_string();
        self.emitted = safe.max(self.emitted);
        (out, false)
    }

    /// Length of the longest suffix of the searched text that is a proper prefix of a stop
    /// string.
    fn held_back(&self) -> usize {
        let searched = &self.text[self.searched_from..];
        let mut longest = 0;
        for stop in self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > longest && searched.ends_with(&stop[..i]) {
                    longest = i;
                }
            }
        }
        longest
    }

    /// Releases what was held back once no more text is coming.
    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_temperature_samples_the_most_likely_token() {
        let logits = [0.5, 3.0, 2.9, -1.0, 1.0];
        for temperature in [1e-40, 1e-20, 1e-6] {
            let mut sampler = Sampler::new(SamplingParams {
                temperature,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..SamplingParams::default()
            })
            .unwrap();
            for _ in 0..20 {
                assert_eq!(sampler.sample(&logits, &[]), 1, "temperature {temperature}");
            }
        }
    }

    #[test]
    fn prompts_past_the_context_are_refused_with_the_numbers() {
        assert!(check_context(64, 60, 4).is_ok());
        let long = check_context(64, 64, 1).unwrap_err().to_string();
        assert!(long.contains("64 tokens"), "{long}");
        let with_reply = check_context(64, 60, 5).unwrap_err().to_string();
        assert!(with_reply.contains("at most 4"), "{with_reply}");
        assert!(matches!(
            check_context(8, usize::MAX, usize::MAX),
            Err(Error::ContextLengthExceeded(_))
        ));
    }

    #[test]
    fn stop_strings_are_never_emitted_even_across_pieces() {
        let stops = vec!["</end>".to_string()];
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for piece in ["Hello <", "/e", "nd> world"] {
            let (text, stopped) = m.push(piece);
            out.push_str(&text);
            if stopped {
                break;
            }
        }
        assert_eq!(out, "Hello ");
        assert_eq!(m.into_text(), "Hello ");
    }

    #[test]
    fn held_back_text_is_released_when_it_cannot_stop() {
        let stops = vec!["ab".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("xa"), ("x".to_string(), false));
        assert_eq!(m.push("c"), ("ac".to_string(), false));
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.finish(), "a");
        assert_eq!(m.into_text(), "xaca");
    }

    /// A chat reply's reasoning passes through unsearched: a stop string is found neither in
    /// it nor across it, and what the answer held back goes out before it.
    #[test]
    fn stop_strings_are_not_sought_in_passed_text_nor_across_it() {
        let stops = vec!["ab".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("xa"), ("x".to_string(), false));
        assert_eq!(m.pass("b ab"), ("a".to_string(), "b ab".to_string()));
        assert_eq!(m.push("b"), ("b".to_string(), false));
        assert_eq!(m.push("zab"), ("z".to_string(), true));
        assert_eq!(m.into_text(), "xab abbz");
    }

    /// The blank lines a chat answer starts without (after its reasoning) are not sought for
    /// stop strings either: they pass through as the reasoning does.
    #[test]
    fn an_answers_leading_blank_lines_are_not_sought() {
        let stops = vec!["\n\n".to_string()];
        let mut m = StopMatcher::new(&stops);
        let (reasoning, answer) = ("a\n\nb", Part::Answer);
        let none = String::new;
        assert_eq!(
            m.take_part(Part::Reasoning, reasoning, reasoning, false),
            (none(), reasoning.to_string(), false)
        );
        assert_eq!(
            m.take_part(answer, "\n\nHi", "Hi", false),
            (none(), "\n\nHi".to_string(), false)
        );
        assert_eq!(
            m.take_part(answer, "\n\nthere", "\n\nthere", false),
            (none(), none(), true)
        );
        // Shown the answer only, the same pieces give its text alone.
        let mut m = StopMatcher::new(&stops);
        assert_eq!(
            m.take_part(Part::Reasoning, reasoning, reasoning, true),
            (none(), none(), false)
        );
        assert_eq!(
            m.take_part(answer, "\n\nHi", "Hi", true),
            (none(), "Hi".to_string(), false)
        );
    }

    /// An answer's tail held back as it could begin a stop string comes out apart when a token
    /// of another part follows (gpt-oss's `<|end|>` after a preamble), so that the caller files
    /// it with the answer, not with that token.
    #[test]
    fn an_answers_held_tail_is_released_apart_before_another_part() {
        let stops = vec!["\n\n".to_string()];
        for answer_only in [false, true] {
            let mut m = StopMatcher::new(&stops);
            let none = String::new;
            assert_eq!(
                m.take_part(Part::Answer, "Hi\n", "Hi\n", answer_only),
                (none(), "Hi".to_string(), false)
            );
            let marker = if answer_only { "" } else { "<|end|>" };
            assert_eq!(
                m.take_part(Part::Structure, "<|end|>", "", answer_only),
                ("\n".to_string(), marker.to_string(), false)
            );
        }
    }

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax_after_repetition_penalty() {
        let logits = [1.0, 3.0, 2.9];
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[]), 1);
        let mut s = sampler(SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 0.1, 2.0, 1.9];
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 1e-6,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.99,
                ..Default::default()
            },
        ] {
            let mut s = sampler(params);
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[]), 2);
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0, (3.0f32).ln()]; // probabilities 1/4 and 3/4
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draws: Vec<u32> = {
            let mut s = sampler(params.clone());
            (0..4000).map(|_| s.sample(&logits, &[])).collect()
        };
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        let mut again = sampler(params);
        let replay: Vec<u32> = (0..4000).map(|_| again.sample(&logits, &[])).collect();
        assert_eq!(draws, replay);
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(
            Sampler::new(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            })
            .is_err()
        );
    }
}
