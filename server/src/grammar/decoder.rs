//! One sequence's constraint while it decodes: the mask of the tokens the grammar allows next,
//! computed on the grammar thread as soon as the previous token is known, so that it is ready
//! (or nearly) when the forward pass has produced the logits.

use std::sync::mpsc::{channel, Receiver};

use llguidance::toktrie::{SimpleVob, TokenId};
use llguidance::Matcher;

use super::{Constraint, GrammarError};

/// Which tokens may come next (borrowed from the decoder: a mask is a bit per vocabulary entry).
pub struct Mask<'a> {
    allowed: &'a SimpleVob,
    eos: TokenId,
}

impl Mask<'_> {
    /// Sets every disallowed logit to −∞. Where the grammar may end here, `stop_ids` (the
    /// turn's ends) stay allowed with the end-of-sequence token. Returns whether any token is
    /// left.
    pub fn apply(&self, logits: &mut [f32], stop_ids: &[u32]) -> bool {
        // The turn's ends keep the model's own logits where the grammar may end here.
        let may_end = self.allowed.is_allowed(self.eos);
        let ends: Vec<(usize, f32)> = if may_end {
            stop_ids.iter().filter_map(|&id| logits.get(id as usize).map(|&l| (id as usize, l))).collect()
        } else {
            Vec::new()
        };
        let mut any = false;
        for (word_index, &word) in self.allowed.as_slice().iter().enumerate() {
            let start = word_index * 32;
            if start >= logits.len() {
                break;
            }
            let end = (start + 32).min(logits.len());
            if word == u32::MAX && end - start == 32 {
                any = true;
                continue;
            }
            for (bit, logit) in logits[start..end].iter_mut().enumerate() {
                if word >> bit & 1 == 0 {
                    *logit = f32::NEG_INFINITY;
                } else {
                    any = true;
                }
            }
        }
        for (id, logit) in ends {
            logits[id] = logit;
            any = true;
        }
        any
    }
}

/// What a sampled token did to the constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// More must or may follow.
    Continue,
    /// The answer is complete: the grammar allows nothing more.
    Complete,
}

enum State {
    /// The mask for the next token is being computed.
    Computing(Receiver<(Matcher, Result<SimpleVob, String>)>),
    Ready(Matcher, SimpleVob),
    Failed(String),
}

/// A sequence's constraint, from its first token to its last.
pub struct ConstrainedDecoder {
    state: State,
    workers: std::sync::Arc<rayon::ThreadPool>,
}

impl ConstrainedDecoder {
    /// Starts computing the first mask at once (while the prompt is prefilled).
    pub fn start(constraint: Constraint) -> Self {
        let matcher = Matcher::new(Ok(constraint.parser));
        let mut decoder = Self { state: State::Failed(String::new()), workers: constraint.workers };
        decoder.compute_next(matcher);
        decoder
    }

    fn compute_next(&mut self, mut matcher: Matcher) {
        let (done, result) = channel();
        self.workers.spawn(move || {
            let mask = matcher.compute_mask_or_eos().map_err(|e| e.to_string());
            let _ = done.send((matcher, mask));
        });
        self.state = State::Computing(result);
    }

    /// The mask for the next token, waiting for the grammar thread if it is still at work.
    pub fn mask(&mut self) -> Result<Mask<'_>, GrammarError> {
        if let State::Computing(result) = &self.state {
            self.state = match result.recv() {
                Ok((matcher, Ok(mask))) => State::Ready(matcher, mask),
                Ok((_, Err(e))) => State::Failed(e),
                Err(_) => State::Failed("the grammar thread stopped".into()),
            };
        }
        match &self.state {
            State::Ready(matcher, mask) => Ok(Mask { allowed: mask, eos: eos_token(matcher) }),
            State::Failed(e) => Err(GrammarError::Engine(e.clone())),
            State::Computing(_) => Err(GrammarError::Engine("the mask is not ready".into())),
        }
    }

    /// Advances the grammar past `token` (sampled under the last mask) and starts on the next
    /// mask unless the answer is complete.
    pub fn accept(&mut self, token: u32) -> Result<Accepted, GrammarError> {
        let State::Ready(mut matcher, _) = std::mem::replace(&mut self.state, State::Failed("no mask".into())) else {
            return Err(GrammarError::Engine("a token was accepted before its mask".into()));
        };
        if token == eos_token(&matcher) {
            return Ok(Accepted::Complete);
        }
        matcher.consume_token(token).map_err(|e| GrammarError::Engine(e.to_string()))?;
        if matcher.is_stopped() {
            return Ok(Accepted::Complete);
        }
        self.compute_next(matcher);
        Ok(Accepted::Continue)
    }
}

fn eos_token(matcher: &Matcher) -> TokenId {
    matcher.tok_env().map_or(TokenId::MAX, |env| env.tok_trie().eos_token())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vob(allowed: &[u32]) -> SimpleVob {
        let mut vob = SimpleVob::alloc(70);
        for &t in allowed {
            vob.allow_token(t);
        }
        vob
    }

    #[test]
    fn disallowed_logits_fall_away_and_the_turns_ends_keep_their_own_where_the_grammar_may_end() {
        let raw: Vec<f32> = (0..70).map(|i| i as f32 * 0.1).collect();
        let mut logits = raw.clone();
        assert!(Mask { allowed: &vob(&[3, 40, 1]), eos: 1 }.apply(&mut logits, &[5, 1]));
        for (i, (&l, &r)) in logits.iter().zip(&raw).enumerate() {
            let kept = [1, 3, 5, 40].contains(&i);
            assert_eq!(l, if kept { r } else { f32::NEG_INFINITY }, "token {i}");
        }
        // Where the grammar may not end, neither may the turn.
        let mut logits = raw.clone();
        assert!(Mask { allowed: &vob(&[3]), eos: 1 }.apply(&mut logits, &[5, 1]));
        assert_eq!((logits[5], logits[1], logits[3]), (f32::NEG_INFINITY, f32::NEG_INFINITY, raw[3]));
        assert!(!Mask { allowed: &vob(&[]), eos: 1 }.apply(&mut raw.clone(), &[5]));
    }
}
