//! Folding a block of keys into running softmaxes. A query row keeps its maximum score m, its
//! denominator l and its weighted sum o; the keys j of a block, with scores s_j, update them as
//!   m' = max(m, max_j s_j),   o ← o·e^(m−m') + Σ_j e^(s_j−m')·v_j,   l ← l·e^(m−m') + Σ_j e^(s_j−m').
//!
//! Two precisions, as llama.cpp's CPU flash attention has: a prompt's rows fold a block at once in
//! f32 ([`fold_block_f32`]); a generated token's row folds key by key with o rounded to f16
//! ([`fold_keys_f16`]). Every row's arithmetic is its own, in the same order whatever rows are
//! folded with it.

use std::ops::Range;

use crate::model::kv::BLOCK_TOKENS;

/// Query rows whose weighted sums share each load of a value vector.
const ROWS_PER_PASS: usize = 4;

/// Folds the keys `slots` of one block (values `[BLOCK_TOKENS][d]`) into the f32 softmaxes of one
/// token's query rows: `scores[r]`, `max[r]`, `sum[r]`, and `acc[r·d..(r+1)·d]`.
pub(super) fn fold_block_f32(scores: &[[f32; BLOCK_TOKENS]], slots: Range<usize>, max: &mut [f32], sum: &mut [f32], values: &[f32], acc: &mut [f32], d: usize) {
    for first in (0..scores.len()).step_by(ROWS_PER_PASS) {
        let rows = first..(first + ROWS_PER_PASS).min(scores.len());
        let mut weights = [[0f32; BLOCK_TOKENS]; ROWS_PER_PASS];
        for (w, r) in weights.iter_mut().zip(rows.clone()) {
            *w = block_weights(&scores[r], slots.clone(), &mut max[r], &mut sum[r], &mut acc[r * d..(r + 1) * d]);
        }
        weighted_sum(&weights[..rows.len()], slots.clone(), values, &mut acc[rows.start * d..rows.end * d], d);
    }
}

/// Raises one row's maximum to the block's (rescaling o and l), and returns the block's weights
/// e^(s_j − m') (zero outside `slots`), their sum added to l.
fn block_weights(scores: &[f32; BLOCK_TOKENS], slots: Range<usize>, max: &mut f32, sum: &mut f32, acc: &mut [f32]) -> [f32; BLOCK_TOKENS] {
    let visible: [f32; BLOCK_TOKENS] = std::array::from_fn(|j| if slots.contains(&j) { scores[j] } else { f32::NEG_INFINITY });
    let new_max = max.max(pairwise(visible, f32::max));
    if *max != new_max {
        let rescale = (*max - new_max).exp();
        acc.iter_mut().for_each(|a| *a *= rescale);
        *sum *= rescale;
        *max = new_max;
    }
    let weights = exp_non_positive(visible.map(|s| s - new_max));
    *sum += pairwise(weights, |a, b| a + b);
    weights
}

/// Reduces a block's lanes pairwise (lane j with j + 8, then j + 4, …): a fixed order that runs
/// in a vector register rather than as a chain of sixteen dependent operations.
fn pairwise(mut lanes: [f32; BLOCK_TOKENS], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = BLOCK_TOKENS;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            lanes[j] = op(lanes[j], lanes[j + width]);
        }
    }
    lanes[0]
}

/// e^x lane by lane for x ≤ 0 (a score less the maximum), to within 2 ulp; −∞ and anything
/// below −87.3 (where f32 turns subnormal) give 0. Written over a whole block so that it runs in
/// vector registers: e^x = 2^n · e^r with n = round(x / ln 2) and r = x − n·ln 2 in
/// [−ln 2 / 2, ln 2 / 2], where e^r ≈ 1 + r + r²·P(r) (Cephes' minimax polynomial for expf).
fn exp_non_positive(x: [f32; BLOCK_TOKENS]) -> [f32; BLOCK_TOKENS] {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
    let mut out = [0f32; BLOCK_TOKENS];
    for (o, &x) in out.iter_mut().zip(&x) {
        let n = (x * std::f32::consts::LOG2_E).round_ties_even();
        let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
        let p = P[1..].iter().fold(P[0], |p, &c| p.mul_add(r, c));
        let e_r = (p * r).mul_add(r, r) + 1.0;
        // 2^n built from its exponent bits; n ≥ −126 wherever the result is kept.
        let two_n = f32::from_bits(((n.max(-126.0) as i32 + 127) as u32) << 23);
        *o = if x < -87.3 { 0.0 } else { e_r * two_n };
    }
    out
}

/// acc[r][i] ← acc[r][i] + Σ_{j ∈ slots} weights[r][j]·values[j][i], for each (r, i) one chain of
/// fused multiply-adds over the keys in order, so every path gives the same bits. With AVX-512,
/// 64 dimensions of up to four rows stay in registers across the block and each value vector is
/// loaded once for all of them; with AVX2, 32 dimensions of two rows.
fn weighted_sum(weights: &[[f32; BLOCK_TOKENS]], slots: Range<usize>, values: &[f32], acc: &mut [f32], d: usize) {
    assert!(values.len() >= slots.end * d && acc.len() == weights.len() * d, "weighted sum over a block of the wrong size");
    // SAFETY: AVX-512F is enabled at compile time; the kernel reads rows j < slots.end of
    // `values` and writes the `weights.len()` rows of `acc`, both checked above.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    let done = unsafe { avx512::weighted_sum(weights, slots.clone(), values, acc, d) };
    // SAFETY: AVX2 and FMA are enabled at compile time; the same bounds as above.
    #[cfg(all(target_arch = "x86_64", not(target_feature = "avx512f"), target_feature = "avx2", target_feature = "fma"))]
    let done = unsafe { avx2::weighted_sum(weights, slots.clone(), values, acc, d) };
    #[cfg(not(all(target_arch = "x86_64", any(target_feature = "avx512f", all(target_feature = "avx2", target_feature = "fma")))))]
    let done = 0;
    for (w, a) in weights.iter().zip(acc.chunks_exact_mut(d)) {
        for j in slots.clone() {
            for (a, &v) in a[done..].iter_mut().zip(&values[j * d + done..(j + 1) * d]) {
                *a = v.mul_add(w[j], *a);
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::BLOCK_TOKENS;

    /// Dimensions per pass: four registers of 16 lanes per row.
    const LANES: usize = 64;

    /// [`super::weighted_sum`] over the dimensions below the last multiple of 64, four rows at
    /// a time; returns how many dimensions it did.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `acc` holds `weights.len()` rows of `d`, and `values` rows
    /// `j < slots.end` of `d`.
    pub(super) unsafe fn weighted_sum(weights: &[[f32; BLOCK_TOKENS]], slots: Range<usize>, values: &[f32], acc: &mut [f32], d: usize) -> usize {
        let vectorised = d - d % LANES;
        for first in (0..weights.len()).step_by(4) {
            let (weights, out) = (&weights[first..], acc.as_mut_ptr().add(first * d));
            match weights.len() {
                1 => rows::<1>(weights, slots.clone(), values.as_ptr(), out, d, vectorised),
                2 => rows::<2>(weights, slots.clone(), values.as_ptr(), out, d, vectorised),
                3 => rows::<3>(weights, slots.clone(), values.as_ptr(), out, d, vectorised),
                _ => rows::<4>(weights, slots.clone(), values.as_ptr(), out, d, vectorised),
            }
        }
        vectorised
    }

    /// `R` rows of [`weighted_sum`], their accumulators in registers.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // see the indexing below
    unsafe fn rows<const R: usize>(weights: &[[f32; BLOCK_TOKENS]], slots: Range<usize>, values: *const f32, out: *mut f32, d: usize, vectorised: usize) {
        for lane in (0..vectorised).step_by(LANES) {
            let mut o = [[_mm512_setzero_ps(); 4]; R];
            for r in 0..R {
                for c in 0..4 {
                    o[r][c] = _mm512_loadu_ps(out.add(r * d + lane + 16 * c));
                }
            }
            for j in slots.clone() {
                let v: [__m512; 4] = std::array::from_fn(|c| _mm512_loadu_ps(values.add(j * d + lane + 16 * c)));
                // Indexed by the constants R and 4 (not zipped with `weights`), so that the
                // loops unroll and `o` stays in registers.
                for r in 0..R {
                    let w = _mm512_set1_ps(weights.get_unchecked(r)[j]);
                    for c in 0..4 {
                        o[r][c] = _mm512_fmadd_ps(v[c], w, o[r][c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..4 {
                    _mm512_storeu_ps(out.add(r * d + lane + 16 * c), o[r][c]);
                }
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", not(target_feature = "avx512f"), target_feature = "avx2", target_feature = "fma"))]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::BLOCK_TOKENS;

    /// Dimensions per pass: four registers of 8 lanes per row, two rows at a time (16 registers
    /// in all, accumulators and values).
    const LANES: usize = 32;

    /// [`super::weighted_sum`] over the dimensions below the last multiple of 32; returns how many
    /// dimensions it did.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `acc` holds `weights.len()` rows of `d`, and `values` rows
    /// `j < slots.end` of `d`.
    pub(super) unsafe fn weighted_sum(weights: &[[f32; BLOCK_TOKENS]], slots: Range<usize>, values: &[f32], acc: &mut [f32], d: usize) -> usize {
        let vectorised = d - d % LANES;
        for first in (0..weights.len()).step_by(2) {
            let out = acc.as_mut_ptr().add(first * d);
            match weights.len() - first {
                1 => rows::<1>(&weights[first..], slots.clone(), values.as_ptr(), out, d, vectorised),
                _ => rows::<2>(&weights[first..], slots.clone(), values.as_ptr(), out, d, vectorised),
            }
        }
        vectorised
    }

    /// `R` rows of [`weighted_sum`], their accumulators in registers (the loops over the
    /// constant R and 4 unroll).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // indexed by the constants, as in the AVX-512 kernel
    unsafe fn rows<const R: usize>(weights: &[[f32; BLOCK_TOKENS]], slots: Range<usize>, values: *const f32, out: *mut f32, d: usize, vectorised: usize) {
        for lane in (0..vectorised).step_by(LANES) {
            let mut o = [[_mm256_setzero_ps(); 4]; R];
            for r in 0..R {
                for c in 0..4 {
                    o[r][c] = _mm256_loadu_ps(out.add(r * d + lane + 8 * c));
                }
            }
            for j in slots.clone() {
                let v: [__m256; 4] = std::array::from_fn(|c| _mm256_loadu_ps(values.add(j * d + lane + 8 * c)));
                for r in 0..R {
                    let w = _mm256_set1_ps(weights.get_unchecked(r)[j]);
                    for c in 0..4 {
                        o[r][c] = _mm256_fmadd_ps(v[c], w, o[r][c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..4 {
                    _mm256_storeu_ps(out.add(r * d + lane + 8 * c), o[r][c]);
                }
            }
        }
    }
}

/// Folds one block's visible keys (`slots`) into a row's running softmax, one key at a time as
/// llama.cpp's CPU flash attention does with 16-bit values: the weighted sum o is kept at f16
/// precision, rounded after every key, and rescaled only when a key raises the maximum. Keeping
/// its roundings keeps the logits within the reference's own noise.
pub(super) fn fold_keys_f16(scores: &[f32; BLOCK_TOKENS], slots: Range<usize>, max: &mut f32, sum: &mut f32, values: &[f32], acc: &mut [f32]) {
    // The scalars first, key by key: m, l, and what each key does to o. Then o's lanes take
    // every key's step in turn, each lane the same operations in the same order as key by key.
    let mut steps = [KeyStep { rescale: None, weight: 0.0 }; BLOCK_TOKENS];
    for (j, step) in slots.clone().zip(&mut steps) {
        let s = scores[j];
        let (mut rescale, mut weight) = (1.0f32, 1.0f32);
        if s > *max {
            rescale = (*max - s).exp();
            *max = s;
            step.rescale = Some(rescale);
        } else {
            weight = (s - *max).exp();
        }
        step.weight = weight;
        *sum = sum.mul_add(rescale, weight);
    }
    let d = acc.len();
    half_precision::fold(acc, &values[slots.start * d..slots.end * d], &steps[..slots.len()]);
}

/// What one key does to a row's o held at f16 precision: o ← f16(o·rescale) when the key raised
/// the maximum, then o ← f16(v·weight + o).
#[derive(Clone, Copy)]
struct KeyStep {
    rescale: Option<f32>,
    weight: f32,
}

/// Updates of a vector held at f16 precision in f32 lanes: each result is rounded to the
/// nearest f16, sixteen (AVX-512) or eight (F16C) lanes at a time where the CPU converts in
/// hardware.
mod half_precision {
    use half::f16;

    use super::KeyStep;

    /// Each key's step on acc in turn (`values`: the keys' value vectors, one per step), key by
    /// key over all the lanes.
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    pub(super) fn fold(acc: &mut [f32], values: &[f32], steps: &[KeyStep]) {
        for (step, v) in steps.iter().zip(values.chunks_exact(acc.len())) {
            key_step(acc, v, step);
        }
    }

    /// Each key's step on acc in turn (`values`: the keys' value vectors, one per step): 128
    /// lanes at a time, held in eight registers through every key, rather than o stored and
    /// loaded again for each key (a decode step's attention is mostly this loop).
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    pub(super) fn fold(acc: &mut [f32], values: &[f32], steps: &[KeyStep]) {
        use std::arch::x86_64::*;
        const REGISTERS: usize = 8;
        const LANES: usize = 16 * REGISTERS;
        let d = acc.len();
        let held = d - d % LANES;
        let round = |x: __m512| unsafe { _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x)) };
        for first in (0..held).step_by(LANES) {
            // SAFETY: the target has AVX-512F (checked at compile time); lanes first..first +
            // LANES lie within acc and within each value vector of d.
            unsafe {
                let mut o: [__m512; REGISTERS] = std::array::from_fn(|i| _mm512_loadu_ps(acc.as_ptr().add(first + 16 * i)));
                for (step, v) in steps.iter().zip(values.chunks_exact(d)) {
                    if let Some(rescale) = step.rescale {
                        let c = _mm512_set1_ps(rescale);
                        o = o.map(|o| round(_mm512_mul_ps(o, c)));
                    }
                    let w = _mm512_set1_ps(step.weight);
                    for (i, o) in o.iter_mut().enumerate() {
                        *o = round(_mm512_fmadd_ps(_mm512_loadu_ps(v.as_ptr().add(first + 16 * i)), w, *o));
                    }
                }
                for (i, o) in o.iter().enumerate() {
                    _mm512_storeu_ps(acc.as_mut_ptr().add(first + 16 * i), *o);
                }
            }
        }
        if held < d {
            for (step, v) in steps.iter().zip(values.chunks_exact(d)) {
                key_step(&mut acc[held..], &v[held..], step);
            }
        }
    }

    /// One key's step on every lane of acc (`v`: its value vector).
    fn key_step(acc: &mut [f32], v: &[f32], step: &KeyStep) {
        if let Some(rescale) = step.rescale {
            update(acc, None, rescale);
        }
        update(acc, Some(v), step.weight);
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    fn update(acc: &mut [f32], v: Option<&[f32]>, w: f32) {
        use std::arch::x86_64::*;
        let mut lanes = acc.chunks_exact_mut(16);
        // SAFETY: the target has AVX-512F (checked at compile time), which converts to and from
        // f16; loads and stores are unaligned and within the chunks.
        unsafe {
            let wv = _mm512_set1_ps(w);
            for (i, a) in lanes.by_ref().enumerate() {
                let current = _mm512_loadu_ps(a.as_ptr());
                let updated = match v {
                    Some(v) => _mm512_fmadd_ps(_mm512_loadu_ps(v.as_ptr().add(i * 16)), wv, current),
                    None => _mm512_mul_ps(current, wv),
                };
                let rounded = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(updated));
                _mm512_storeu_ps(a.as_mut_ptr(), rounded);
            }
        }
        let tail = acc.len() - acc.len() % 16;
        scalar(&mut acc[tail..], v.map(|v| &v[tail..]), w);
    }

    #[cfg(all(target_arch = "x86_64", not(target_feature = "avx512f"), target_feature = "f16c", target_feature = "fma"))]
    fn update(acc: &mut [f32], v: Option<&[f32]>, w: f32) {
        use std::arch::x86_64::*;
        let mut lanes = acc.chunks_exact_mut(8);
        // SAFETY: the target has F16C and FMA (checked at compile time); loads and stores are
        // unaligned and within the chunks.
        unsafe {
            let wv = _mm256_set1_ps(w);
            for (i, a) in lanes.by_ref().enumerate() {
                let current = _mm256_loadu_ps(a.as_ptr());
                let updated = match v {
                    Some(v) => _mm256_fmadd_ps(_mm256_loadu_ps(v.as_ptr().add(i * 8)), wv, current),
                    None => _mm256_mul_ps(current, wv),
                };
                let rounded = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(updated));
                _mm256_storeu_ps(a.as_mut_ptr(), rounded);
            }
        }
        let tail = acc.len() - acc.len() % 8;
        scalar(&mut acc[tail..], v.map(|v| &v[tail..]), w);
    }

    #[cfg(not(all(target_arch = "x86_64", any(target_feature = "avx512f", all(target_feature = "f16c", target_feature = "fma")))))]
    fn update(acc: &mut [f32], v: Option<&[f32]>, w: f32) {
        scalar(acc, v, w);
    }

    fn scalar(acc: &mut [f32], v: Option<&[f32]>, w: f32) {
        for (i, a) in acc.iter_mut().enumerate() {
            let updated = match v {
                Some(v) => v[i].mul_add(w, *a),
                None => *a * w,
            };
            *a = f16::from_f32(updated).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_of_a_shifted_score_is_within_two_ulp_and_vanishes_below_f32s_range() {
        let mut worst = 0f64;
        for step in 0..=87_000 {
            let x = -(step as f32) * 1e-3;
            let mut lanes = [0f32; BLOCK_TOKENS];
            lanes.iter_mut().enumerate().for_each(|(i, l)| *l = x - i as f32 * 3.7e-5);
            for (&x, &got) in lanes.iter().zip(&exp_non_positive(lanes)) {
                let want = (x as f64).exp();
                worst = worst.max(((got as f64 - want) / want).abs());
            }
        }
        assert!(worst < 2.0 * f32::EPSILON as f64, "relative error {worst:e}");
        let edge = exp_non_positive([f32::NEG_INFINITY, -88.0, -1000.0, 0.0, -0.0, -1e-30, -87.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0]);
        assert_eq!(&edge[..6], &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        assert!(edge[6] > 0.0 && edge[6].is_normal());
    }

    /// Folding key by key at f16 precision gives every lane, whether held in registers through
    /// the keys or past the last whole 128, the bits of the plain key-by-key fold; keys that
    /// raise the maximum rescale o first.
    #[test]
    fn a_key_by_key_fold_gives_each_lane_the_plain_folds_bits() {
        let d = 256 + 24;
        let values: Vec<f32> = (0..BLOCK_TOKENS * d).map(|x| ((x * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let scores: [f32; BLOCK_TOKENS] = std::array::from_fn(|j| [0.3, -1.2, 0.9, 0.1, 1.7, -0.4, 1.7, 2.5][j % 8] + j as f32 * 0.01);
        let slots = 1..14;
        let half = |x: f32| half::f16::from_f32(x).to_f32();
        let (mut max, mut sum) = (0.5f32, 1.0f32);
        let mut acc: Vec<f32> = (0..d).map(|i| half(i as f32 / d as f32 - 0.5)).collect();
        let (mut want_max, mut want_sum, mut want) = (max, sum, acc.clone());
        for j in slots.clone() {
            let s = scores[j];
            let (mut rescale, mut weight) = (1.0f32, 1.0f32);
            if s > want_max {
                rescale = (want_max - s).exp();
                want_max = s;
                want.iter_mut().for_each(|o| *o = half(*o * rescale));
            } else {
                weight = (s - want_max).exp();
            }
            want.iter_mut().enumerate().for_each(|(i, o)| *o = half(values[j * d + i].mul_add(weight, *o)));
            want_sum = want_sum.mul_add(rescale, weight);
        }
        fold_keys_f16(&scores, slots, &mut max, &mut sum, &values, &mut acc);
        assert_eq!((max, sum), (want_max, want_sum));
        assert_eq!(acc, want);
    }

    /// The block fold of several rows gives each row the bits it gets folded alone, and the
    /// value of a dense softmax.
    #[test]
    fn a_block_fold_gives_each_row_its_own_bits_and_the_softmax() {
        let d = 24 + 64;
        let value = |j: usize, i: usize| ((j * 31 + i * 7) % 23) as f32 / 11.0 - 1.0;
        let values: Vec<f32> = (0..BLOCK_TOKENS * d).map(|x| value(x / d, x % d)).collect();
        let scores: Vec<[f32; BLOCK_TOKENS]> = (0..6).map(|r| std::array::from_fn(|j| ((r * 5 + j * 3) % 7) as f32 * 0.4 - 1.0)).collect();
        let slots = 2..13;
        let fold = |rows: Range<usize>| {
            let n = rows.len();
            let (mut max, mut sum, mut acc) = (vec![0.5f32; n], vec![1.0f32; n], vec![0.25f32; n * d]);
            fold_block_f32(&scores[rows], slots.clone(), &mut max, &mut sum, &values, &mut acc, d);
            (max, sum, acc)
        };
        let together = fold(0..6);
        for r in 0..6 {
            let alone = fold(r..r + 1);
            assert_eq!(alone.0[0], together.0[r]);
            assert_eq!(alone.1[0], together.1[r]);
            assert_eq!(alone.2, together.2[r * d..(r + 1) * d], "row {r}");
            // o/l against the same fold in f64: a prior state (m 0.5, l 1, o 0.25) and the block.
            let m = slots.clone().map(|j| scores[r][j] as f64).fold(0.5, f64::max);
            let w = |s: f64| (s - m).exp();
            let l = w(0.5) + slots.clone().map(|j| w(scores[r][j] as f64)).sum::<f64>();
            for i in 0..d {
                let o = 0.25 * w(0.5) + slots.clone().map(|j| w(scores[r][j] as f64) * value(j, i) as f64).sum::<f64>();
                let got = together.2[r * d + i] / together.1[r];
                assert!((got as f64 - o / l).abs() < 1e-6, "row {r} dim {i}: {got} vs {}", o / l);
            }
        }
    }
}
