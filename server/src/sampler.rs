//! Turning logits into the next token: temperature, top-k, top-p, seeded randomness, and the
//! top log-probabilities reported to clients.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: Option<usize>,
    /// Drop tokens whose probability is below `min_p` times the most likely one's.
    pub min_p: f32,
    pub seed: u64,
    /// OpenAI's penalties over generated tokens: `l −= frequency·count + presence·[count > 0]`.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Divides positive logits (multiplies negative ones) of every token seen in the prompt or
    /// the output; 1 is off.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn has_penalties(&self) -> bool {
        self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// Applies the penalties to `logits` in place. `generated` counts each output token;
    /// `seen` lists every token of the prompt and the output.
    pub fn apply_penalties(
        &self,
        logits: &mut [f32],
        generated: &std::collections::HashMap<u32, u32>,
        seen: impl IntoIterator<Item = u32>,
    ) {
        if self.repetition_penalty != 1.0 {
            let mut done = std::collections::HashSet::new();
            for id in seen {
                if done.insert(id) {
                    let l = &mut logits[id as usize];
                    *l = if *l > 0.0 {
                        *l / self.repetition_penalty
                    } else {
                        *l * self.repetition_penalty
                    };
                }
            }
        }
        for (&id, &count) in generated {
            logits[id as usize] -=
                self.frequency_penalty * count as f32 + self.presence_penalty * (count > 0) as u8 as f32;
        }
    }
}

/// A sampler owns its random stream, so a sequence's draws depend only on its own seed.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Weights relative to the most likely token (whose weight is exp(0) = 1).
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| (id as u32, ((l - max) * inv_t).exp()))
            .filter(|&(_, p)| p > 0.0)
            .collect();
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Only top-k and top-p need an order, and only top-p over more than k tokens needs it
        // over everything: a full sort of a 262k vocabulary costs more than the step's sampling
        // is worth, so the rest draw in id order.
        if let Some(k) = self.params.top_k.filter(|&k| k > 0 && k < candidates.len()) {
            candidates.select_nth_unstable_by(k - 1, by_weight);
            candidates.truncate(k);
        }
        if self.params.min_p > 0.0 {
            let floor = self.params.min_p;
            candidates.retain(|c| c.1 >= floor);
        }
        if self.params.top_p < 1.0 || self.params.top_k.is_some() {
            candidates.sort_unstable_by(by_weight);
        }
        if self.params.top_p < 1.0 {
            let total: f32 = candidates.iter().map(|c| c.1).sum();
            let mut kept_mass = 0.0;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                kept_mass += c.1 / total;
                if kept_mass >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for &(id, p) in &candidates {
            if draw < p {
                return id;
            }
            draw -= p;
        }
        candidates.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// The id of the largest logit, the first one where several tie.
///
/// Sixteen running maxima (lane i sees the ids ≡ i mod 16) run in vector registers: a scan of
/// a 262k-token vocabulary one comparison after another costs a decode step of 16 rows about
/// as much as its attention.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [0u32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        for (lane, &l) in chunk.iter().enumerate() {
            let larger = l > best[lane];
            best[lane] = if larger { l } else { best[lane] };
            at[lane] = if larger { (c * LANES + lane) as u32 } else { at[lane] };
        }
    }
    let tail_start = logits.len() - tail.len();
    let lanes = best.into_iter().zip(at).chain(tail.iter().enumerate().map(|(i, &l)| (l, (tail_start + i) as u32)));
    // Each lane holds its first largest; between lanes, the larger value, then the lower id.
    lanes.fold((f32::NEG_INFINITY, 0u32), |(bv, bi), (v, i)| if v > bv || (v == bv && i < bi) { (v, i) } else { (bv, bi) }).1
}

/// log-softmax of the raw logits: `l_i − log Σ exp(l_j)`.
pub fn log_softmax_at(logits: &[f32], ids: impl IntoIterator<Item = u32>) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    ids.into_iter().map(|id| logits[id as usize] - lse).collect()
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` most likely tokens with their log-probabilities, most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (id, &l) in logits.iter().enumerate() {
        if best.len() == k && l <= best[k - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (id as u32, l));
        best.truncate(k);
    }
    best.into_iter().map(|(id, l)| (id, l - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    /// The lane-wise scan finds what a plain scan finds: the first of equal maxima, wherever it
    /// falls (in a lane, across lanes, in the tail), and 0 when nothing beats −∞.
    #[test]
    fn argmax_is_the_first_largest_at_any_position() {
        let first_largest = |l: &[f32]| (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32;
        for len in [1, 15, 16, 17, 40, 262_147] {
            let logits: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1009) as f32 * 0.01).collect();
            assert_eq!(argmax(&logits), first_largest(&logits), "{len}");
            for peak in [0, len / 2, len - 1] {
                let mut tied = logits.clone();
                tied[peak] = 100.0;
                tied[len - 1] = 100.0;
                assert_eq!(argmax(&tied), first_largest(&tied), "{len}, peak {peak}");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 42,
            ..SamplingParams::default()
        };
        let draws = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(&params), draws(&params));
        let top1 = SamplingParams {
            top_k: Some(1),
            ..params
        };
        assert!(draws(&top1).iter().all(|&t| t == argmax(&logits)));
    }

    #[test]
    fn draws_follow_the_softmax_with_and_without_an_order() {
        // Weights 1 : 2 : 3 : 4 at temperature 1; top-p 1 draws in id order, top-k 4 in
        // weight order: both land on the same frequencies.
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|w| w.ln()).collect();
        for top_k in [None, Some(4)] {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k, seed: 9, ..Default::default() });
            let mut counts = [0usize; 4];
            for _ in 0..40_000 {
                counts[s.sample(&logits) as usize] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                let expected = (i + 1) as f64 / 10.0;
                assert!((c as f64 / 40_000.0 - expected).abs() < 0.01, "{top_k:?}: {counts:?}");
            }
        }
    }

    #[test]
    fn min_p_keeps_only_tokens_near_the_best() {
        // Probabilities ∝ e^3, e^2.9, e^0: min_p 0.5 keeps the first two.
        let logits = [3.0, 2.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: 3,
            ..SamplingParams::default()
        });
        let draws: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert_eq!(draws, [0, 1].into_iter().collect());
    }

    #[test]
    fn penalties_follow_openai_and_ctrl() {
        let params = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        let mut logits = [4.0, -4.0, 4.0, 1.0];
        let generated = [(0u32, 2u32)].into_iter().collect();
        params.apply_penalties(&mut logits, &generated, [0, 1, 0]);
        // Token 0: 4/2 − 0.5·2 − 1 = 0; token 1 (prompt only): −4·2; others untouched.
        assert_eq!(logits, [0.0, -8.0, 4.0, 1.0]);
    }

    #[test]
    fn top_logprobs_are_sorted_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let top = top_logprobs(&logits, 2);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert_eq!(top[0].0, 1);
        assert_eq!(top[1].0, 2);
        assert!((top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-5);
        assert!((log_softmax_at(&logits, [2])[0] - top[1].1).abs() < 1e-6);
    }
}
