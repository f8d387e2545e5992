//! Turning a growing list of token ids into text deltas, and cutting the text at stop strings.

use crate::tokenizer::Tokenizer;

/// Decodes ids incrementally. A character split across byte-fallback tokens is held back until
/// it is complete, and a window of earlier tokens keeps SentencePiece spacing right.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // Invalid byte sequences may decode to a different number of U+FFFD in a longer
            // window, so the earlier text is not always a prefix: cut at a character boundary.
            let mut start = prefix.len();
            if !full.starts_with(&prefix) {
                while !full.is_char_boundary(start) {
                    start -= 1;
                }
            }
            let delta = full[start..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}

/// Holds back text that might be the start of a stop string, and reports where a stop string
/// completes. The stop string itself is never emitted.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

pub enum StopScan {
    /// Text safe to emit now.
    Continue(String),
    /// A stop string matched: the text before it.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn feed(&mut self, delta: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Continue(delta.to_string());
        }
        self.pending.push_str(delta);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopScan::Stopped(before);
        }
        // Keep the longest suffix that a stop string starts with.
        let held = self
            .stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len().min(self.pending.len() + 1))
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n))
                    .find(|&n| self.pending.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0);
        let emit_to = self.pending.len() - held;
        let emitted = self.pending[..emit_to].to_string();
        self.pending.drain(..emit_to);
        StopScan::Continue(emitted)
    }

    /// The held-back text, when the generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.feed(d) {
                StopScan::Continue(t) => out.push_str(&t),
                StopScan::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_deltas_is_never_emitted() {
        assert_eq!(run(&["END"], &["abc E", "N", "D more"]), ("abc ".into(), true));
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["END"], &["abc E", "x"]), ("abc Ex".into(), false));
        assert_eq!(run(&["END"], &["abc EN"]), ("abc EN".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["two", "one"], &["zero one two"]), ("zero ".into(), true));
    }
}
