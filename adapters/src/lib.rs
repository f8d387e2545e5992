//! Adapters and the deltas they make to the linear layers of a frozen base model.
//!
//! A linear layer computes `y = x·Wᵀ + b`. Three kinds of adapter change it:
//! - LoRA adds, for each of its target layers, `Δy = s·(x·Aᵀ)·Bᵀ` with `A: [r, in]`, `B: [out, r]`
//!   and `s = α/r` (or `α/√r` with rsLoRA);
//! - DoRA rescales each output row of the LoRA-updated weight to a learned magnitude m:
//!   `W′ = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`;
//! - IA³ scales k's and v's outputs and the feed-forward input of `down` by learned vectors l.
//!
//! Several adapters compose by summing their changes to the weight, each with its own
//! request-given weight.

pub mod peft;

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use half::f16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdapterError {
    #[error("LoRA {module} of layer {layer}: {reason}")]
    Shape {
        layer: usize,
        module: TargetModule,
        reason: String,
    },
}

/// The seven linear layers of a transformer block that LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
        TargetModule::Gate,
        TargetModule::Up,
        TargetModule::Down,
    ];

    /// The module's name in Hugging Face PEFT (`target_modules`).
    pub fn peft_name(self) -> &'static str {
        match self {
            TargetModule::Q => "q_proj",
            TargetModule::K => "k_proj",
            TargetModule::V => "v_proj",
            TargetModule::O => "o_proj",
            TargetModule::Gate => "gate_proj",
            TargetModule::Up => "up_proj",
            TargetModule::Down => "down_proj",
        }
    }

    /// The tensor's name inside a GGUF block (`blk.N.<name>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            TargetModule::Q => "attn_q",
            TargetModule::K => "attn_k",
            TargetModule::V => "attn_v",
            TargetModule::O => "attn_output",
            TargetModule::Gate => "ffn_gate",
            TargetModule::Up => "ffn_up",
            TargetModule::Down => "ffn_down",
        }
    }

    pub fn from_peft_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.peft_name() == name)
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

/// One layer's low-rank pair: `a` is `[rank, in_features]` row-major, B is kept transposed as
/// `b_t: [rank, out_features]` so that adding (x·Aᵀ)·Bᵀ is `rank` vectorisable row updates; `scale`
/// already holds α/r. Factors are stored as f16 (widened to f32 per row when used): with many
/// adapters in one batch, their bytes are what each step streams from memory.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    a: Vec<f16>,
    b_t: Vec<f16>,
}

impl LoraDelta {
    pub fn new(
        layer: usize,
        module: TargetModule,
        (in_features, out_features, rank): (usize, usize, usize),
        scale: f32,
        a: Vec<f32>,
        b: Vec<f32>,
    ) -> Result<Self, AdapterError> {
        let shape_error = |reason: String| AdapterError::Shape {
            layer,
            module,
            reason,
        };
        if rank == 0 {
            return Err(shape_error("rank is 0".into()));
        }
        if a.len() != rank * in_features {
            return Err(shape_error(format!(
                "lora_A has {} values, expected [{rank}, {in_features}]",
                a.len()
            )));
        }
        if b.len() != out_features * rank {
            return Err(shape_error(format!(
                "lora_B has {} values, expected [{out_features}, {rank}]",
                b.len()
            )));
        }
        if let Some(v) = a.iter().chain(&b).find(|v| !v.is_finite() || v.abs() > f16::MAX.to_f32()) {
            return Err(shape_error(format!("value {v} does not fit in f16")));
        }
        let mut b_t = vec![f16::ZERO; b.len()];
        for (o, row) in b.chunks_exact(rank).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                b_t[j * out_features + o] = f16::from_f32(v);
            }
        }
        Ok(Self {
            rank,
            in_features,
            out_features,
            scale,
            a: a.iter().map(|&v| f16::from_f32(v)).collect(),
            b_t,
        })
    }

    /// `row += s·(B·A)[o, :]`: output row o of the delta matrix, over the input features.
    pub fn add_row_of_product(&self, o: usize, row: &mut [f32]) {
        for (j, a_row) in self.a.chunks_exact(self.in_features).enumerate() {
            let t = self.scale * self.b_t[j * self.out_features + o].to_f32();
            simd::axpy_f16(t, a_row, row);
        }
    }

    /// Bytes held by the two factors.
    pub fn size_in_bytes(&self) -> usize {
        (self.a.len() + self.b_t.len()) * std::mem::size_of::<f16>()
    }

    /// `y += weight·scale·(x·Aᵀ)·Bᵀ` for every row of `x` (`[rows, in]`) and `y` (`[rows, out]`).
    pub fn add_to(&self, weight: f32, x: &[f32], y: &mut [f32]) {
        let rows = x.len() / self.in_features;
        self.add_to_rows(&[(0..rows, weight)], x, y);
    }

    /// The same for several row ranges of one batch, each with its composition weight (SGMV):
    /// each row of A and of B is read once for all the ranges. `x` and `y` hold the whole batch.
    pub fn add_to_rows(&self, ranges: &[(Range<usize>, f32)], x: &[f32], y: &mut [f32]) {
        let rows: Vec<(usize, f32)> = ranges
            .iter()
            .flat_map(|(range, weight)| range.clone().map(move |row| (row, weight * self.scale)))
            .collect();
        // xa[k, j] = s_k·(x_k · A_j), A's rows outermost.
        let mut xa = vec![0f32; rows.len() * self.rank];
        for (j, a_row) in self.a.chunks_exact(self.in_features).enumerate() {
            for (k, &(row, s)) in rows.iter().enumerate() {
                let x_row = &x[row * self.in_features..(row + 1) * self.in_features];
                xa[k * self.rank + j] = s * simd::dot_f16(x_row, a_row);
            }
        }
        // y_k += Σ_j xa[k, j]·Bᵀ_j, Bᵀ's rows outermost.
        for (j, b_row) in self.b_t.chunks_exact(self.out_features).enumerate() {
            for (k, &(row, _)) in rows.iter().enumerate() {
                let t = xa[k * self.rank + j];
                simd::axpy_f16(t, b_row, &mut y[row * self.out_features..(row + 1) * self.out_features]);
            }
        }
    }
}

/// f32 × f16 kernels, widening in registers with AVX-512 or AVX2 where the CPU has it. Each computes a
/// row from that row's values alone, so results never depend on which rows share a batch.
mod simd {
    use half::f16;

    /// Σ x_i·w_i.
    pub fn dot_f16(x: &[f32], w: &[f16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected; lengths are checked inside.
            return unsafe { avx512::dot(x, w) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::detected() {
            // SAFETY: as above.
            return unsafe { avx2::dot(x, w) };
        }
        x.iter().zip(w).map(|(a, b)| a * b.to_f32()).sum()
    }

    /// y_i += t·w_i.
    pub fn axpy_f16(t: f32, w: &[f16], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: as above.
            return unsafe { avx512::axpy(t, w, y) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::detected() {
            // SAFETY: as above.
            return unsafe { avx2::axpy(t, w, y) };
        }
        for (y, w) in y.iter_mut().zip(w) {
            *y += t * w.to_f32();
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use std::arch::x86_64::*;

        use half::f16;

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn dot(x: &[f32], w: &[f16]) -> f32 {
            let n = x.len().min(w.len());
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(x.as_ptr().add(i)), wv, acc);
                i += 16;
            }
            let mut sum = _mm512_reduce_add_ps(acc);
            for j in i..n {
                sum += x[j] * w[j].to_f32();
            }
            sum
        }

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn axpy(t: f32, w: &[f16], y: &mut [f32]) {
            let n = y.len().min(w.len());
            let tv = _mm512_set1_ps(t);
            let mut i = 0;
            while i + 16 <= n {
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i));
                let yp = y.as_mut_ptr().add(i);
                _mm512_storeu_ps(yp, _mm512_fmadd_ps(tv, wv, _mm512_loadu_ps(yp)));
                i += 16;
            }
            for j in i..n {
                y[j] += t * w[j].to_f32();
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use half::f16;

        pub(super) fn detected() -> bool {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn dot(x: &[f32], w: &[f16]) -> f32 {
            let n = x.len().min(w.len());
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), wv, acc);
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            let mut sum: f32 = lanes.iter().sum();
            for j in i..n {
                sum += x[j] * w[j].to_f32();
            }
            sum
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn axpy(t: f32, w: &[f16], y: &mut [f32]) {
            let n = y.len().min(w.len());
            let tv = _mm256_set1_ps(t);
            let mut i = 0;
            while i + 8 <= n {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i));
                let yp = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(yp, _mm256_fmadd_ps(tv, wv, _mm256_loadu_ps(yp)));
                i += 8;
            }
            for j in i..n {
                y[j] += t * w[j].to_f32();
            }
        }
    }
}


/// The three kinds of delta Tessera serves and trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdapterKind {
    /// Low-rank: `W′ = W + s·B·A`.
    #[default]
    Lora,
    /// Weight-decomposed low-rank: `W′ = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`, per output row.
    Dora,
    /// Learned per-channel scales on k, v and the input of `down`.
    Ia3,
}

impl AdapterKind {
    pub const ALL: [AdapterKind; 3] = [AdapterKind::Lora, AdapterKind::Dora, AdapterKind::Ia3];

    /// The kind's name in the API (`lora`, `dora`, `ia3`).
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Lora => "lora",
            AdapterKind::Dora => "dora",
            AdapterKind::Ia3 => "ia3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an adapter does to one linear layer `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub enum ModuleDelta {
    /// LoRA: `y += s·(x·Aᵀ)·Bᵀ`.
    LowRank(LoraDelta),
    /// DoRA: `y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b` with `g = m / ‖W + s·B·A‖` per output row,
    /// measured once against the base when the adapter loads. `low_rank` holds `g ⊙ B` in place
    /// of B, so serving adds the low-rank term as LoRA does and one per-row scale `g` on x·Wᵀ.
    Dora { low_rank: LoraDelta, row_scale: Vec<f32> },
    /// IA³ on an output (k, v): `y = l ⊙ (x·Wᵀ + b)`.
    ScaleOutput(Vec<f32>),
    /// IA³ on an input (the feed-forward input of `down`): `y = (l ⊙ x)·Wᵀ + b`.
    ScaleInput(Vec<f32>),
}

impl ModuleDelta {
    pub fn size_in_bytes(&self) -> usize {
        match self {
            ModuleDelta::LowRank(delta) => delta.size_in_bytes(),
            ModuleDelta::Dora { low_rank, row_scale } => low_rank.size_in_bytes() + std::mem::size_of_val(row_scale.as_slice()),
            ModuleDelta::ScaleOutput(l) | ModuleDelta::ScaleInput(l) => std::mem::size_of_val(l.as_slice()),
        }
    }

    /// The low-rank pair, for LoRA and DoRA (whose B is already scaled by g).
    pub fn low_rank(&self) -> Option<&LoraDelta> {
        match self {
            ModuleDelta::LowRank(delta) | ModuleDelta::Dora { low_rank: delta, .. } => Some(delta),
            ModuleDelta::ScaleOutput(_) | ModuleDelta::ScaleInput(_) => None,
        }
    }

    /// The per-output factor this delta puts on the base product x·Wᵀ: DoRA's g, IA³'s l.
    fn output_scale(&self) -> Option<&[f32]> {
        match self {
            ModuleDelta::Dora { row_scale, .. } => Some(row_scale),
            ModuleDelta::ScaleOutput(l) => Some(l),
            ModuleDelta::LowRank(_) | ModuleDelta::ScaleInput(_) => None,
        }
    }
}

/// An adapter's deltas, keyed by (layer, module), all of one kind. Layers it does not target
/// are absent.
#[derive(Debug, Clone, Default)]
pub struct AdapterWeights {
    kind: AdapterKind,
    deltas: HashMap<(usize, TargetModule), ModuleDelta>,
}

impl AdapterWeights {
    pub fn new(kind: AdapterKind) -> Self {
        Self { kind, deltas: HashMap::new() }
    }

    pub fn kind(&self) -> AdapterKind {
        self.kind
    }

    /// Adds a LoRA pair.
    pub fn insert(&mut self, layer: usize, module: TargetModule, delta: LoraDelta) {
        self.insert_delta(layer, module, ModuleDelta::LowRank(delta));
    }

    pub fn insert_delta(&mut self, layer: usize, module: TargetModule, delta: ModuleDelta) {
        self.deltas.insert((layer, module), delta);
    }

    pub fn delta(&self, layer: usize, module: TargetModule) -> Option<&ModuleDelta> {
        self.deltas.get(&(layer, module))
    }

    /// The low-rank pair of (layer, module), for LoRA and DoRA.
    pub fn get(&self, layer: usize, module: TargetModule) -> Option<&LoraDelta> {
        self.delta(layer, module).and_then(ModuleDelta::low_rank)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.deltas.values().map(ModuleDelta::size_in_bytes).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// The (layer, module) pairs it has a delta for, in no particular order.
    pub fn targets(&self) -> impl Iterator<Item = (usize, TargetModule)> + '_ {
        self.deltas.keys().copied()
    }
}

/// The adapters applied to one request, each with its composition weight w. Each adapter moves
/// the layer from W to its own W′ by w·(W′ − W): LoRA adds w·s·B·A; DoRA w·((g − 1) ⊙ W + g ⊙ s·B·A);
/// IA³ w·(l − 1) ⊙ W on outputs (and the bias), w·W·diag(l − 1) on inputs.
#[derive(Debug, Clone, Default)]
pub struct AdapterMix<'a> {
    pub parts: Vec<(&'a AdapterWeights, f32)>,
}

impl AdapterMix<'_> {
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// `c = 1 + Σ w·(f − 1)` over the parts whose delta at (layer, module) scales the base
    /// product's outputs (f = g or l), with `d = Σ w·(l − 1) ⊙ b` for IA³ (which scales the
    /// bias as well); `None` when no part does.
    fn output_scale(&self, layer: usize, module: TargetModule, bias: Option<&[f32]>) -> Option<(Vec<f32>, Vec<f32>)> {
        let mut scale: Option<(Vec<f32>, Vec<f32>)> = None;
        for (weights, w) in &self.parts {
            let Some(delta) = weights.delta(layer, module) else { continue };
            let Some(f) = delta.output_scale() else { continue };
            let (c, d) = scale.get_or_insert_with(|| (vec![1.0; f.len()], vec![0.0; f.len()]));
            for (c, f) in c.iter_mut().zip(f) {
                *c += w * (f - 1.0);
            }
            if let (ModuleDelta::ScaleOutput(l), Some(bias)) = (delta, bias) {
                for ((d, l), b) in d.iter_mut().zip(l).zip(bias) {
                    *d += w * (l - 1.0) * b;
                }
            }
        }
        scale
    }

    /// `c = 1 + Σ w·(l − 1)` over the parts that scale `down`'s input at `layer`.
    fn down_input_scale(&self, layer: usize) -> Option<Vec<f32>> {
        let mut scale: Option<Vec<f32>> = None;
        for (weights, w) in &self.parts {
            let Some(ModuleDelta::ScaleInput(l)) = weights.delta(layer, TargetModule::Down) else { continue };
            let c = scale.get_or_insert_with(|| vec![1.0; l.len()]);
            for (c, l) in c.iter_mut().zip(l) {
                *c += w * (l - 1.0);
            }
        }
        scale
    }

    /// Whether a part adds a low-rank term to `down` at `layer`: that term reads `down`'s input
    /// as it came, unscaled by IA³.
    fn adds_low_rank_to_down(&self, layer: usize) -> bool {
        self.parts.iter().any(|(weights, _)| weights.get(layer, TargetModule::Down).is_some())
    }

    /// IA³'s scale on `down`'s input, served on `up`'s output instead. `down`'s input is
    /// act(gate) ⊙ up, so c ⊙ it = act(gate) ⊙ (c ⊙ up): scaling up's finished rows (bias and
    /// deltas included) costs one multiply per value and no copy of the activations. Not where
    /// a part also adds a low-rank term to `down`, which must read the unscaled input.
    fn down_input_scale_on_up(&self, layer: usize) -> Option<Vec<f32>> {
        if self.adds_low_rank_to_down(layer) {
            return None;
        }
        self.down_input_scale(layer)
    }

    /// IA³'s scale on `down`'s input where it cannot move to `up` (see
    /// [`Self::down_input_scale_on_up`]).
    fn down_input_scale_in_place(&self, layer: usize) -> Option<Vec<f32>> {
        if !self.adds_low_rank_to_down(layer) {
            return None;
        }
        self.down_input_scale(layer)
    }
}

/// Multiplies each segment's rows of `values` (`[rows, width]`) by its own factors, where
/// `factors` gives it some.
fn scale_segment_rows<'a>(
    segments: impl IntoIterator<Item = (Range<usize>, &'a AdapterMix<'a>)>,
    factors: impl Fn(&AdapterMix) -> Option<Vec<f32>>,
    values: &mut [f32],
) -> bool {
    let mut scaled = false;
    for (rows, mix) in segments {
        let Some(c) = factors(mix) else { continue };
        for row in values[rows.start * c.len()..rows.end * c.len()].chunks_exact_mut(c.len()) {
            for (v, c) in row.iter_mut().zip(&c) {
                *v *= c;
            }
        }
        scaled = true;
    }
    scaled
}

/// The last change to (layer, module)'s finished output `y` (`[rows, out]`, bias added): on
/// `up`, each segment's IA³ scale on `down`'s input, where it moves there (see
/// [`AdapterMix::down_input_scale_on_up`]). Other modules are left as they are.
pub fn scale_finished_outputs<'a>(
    layer: usize,
    module: TargetModule,
    segments: impl IntoIterator<Item = (Range<usize>, &'a AdapterMix<'a>)>,
    y: &mut [f32],
) {
    if module == TargetModule::Up {
        scale_segment_rows(segments, |mix| mix.down_input_scale_on_up(layer), y);
    }
}

/// Scales, before the base product, the rows of `down`'s input `x` (`[rows, ffn]`) whose mix
/// scales it and also adds a low-rank term to `down` (so the scale could not move to `up`).
/// Returns whether any row changed.
pub fn scale_down_inputs_in_place<'a>(
    layer: usize,
    segments: impl IntoIterator<Item = (Range<usize>, &'a AdapterMix<'a>)>,
    x: &mut [f32],
) -> bool {
    scale_segment_rows(segments, |mix| mix.down_input_scale_in_place(layer), x)
}

/// Whether some segment's mix scales `down`'s input at `layer` before its product (see
/// [`scale_down_inputs_in_place`]).
pub fn batch_scales_down_inputs<'a>(layer: usize, mut mixes: impl Iterator<Item = &'a AdapterMix<'a>>) -> bool {
    mixes.any(|mix| mix.adds_low_rank_to_down(layer) && mix.parts.iter().any(|(w, _)| matches!(w.delta(layer, TargetModule::Down), Some(ModuleDelta::ScaleInput(_)))))
}

/// Adds one layer's deltas for a whole batch whose row ranges each have their own mix. `y`
/// holds the base product x·Wᵀ (without the bias `bias`, which the caller adds after).
///
/// First each row's base product takes its mix's output scales (DoRA's g, IA³'s l). Then the
/// low-rank terms: the ranges are grouped by adapter, so each adapter's factors are read once
/// per step however many sequences use it (Punica's SGMV), with every weight·α/r folded into
/// its rows ahead.
///
/// A row's deltas are added in its own mix's order (round k adds every mix's k-th part), so
/// what a row gets never depends on which other sequences share the batch: floating-point sums
/// in another order would round differently.
pub fn add_batch_deltas<'a>(
    layer: usize,
    module: TargetModule,
    segments: impl IntoIterator<Item = (Range<usize>, &'a AdapterMix<'a>)>,
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let segments: Vec<(Range<usize>, &AdapterMix)> = segments.into_iter().collect();
    for (rows, mix) in &segments {
        let Some((c, d)) = mix.output_scale(layer, module, bias) else { continue };
        for row in rows.clone() {
            for ((y, c), d) in y[row * c.len()..(row + 1) * c.len()].iter_mut().zip(&c).zip(&d) {
                *y = *y * c + d;
            }
        }
    }
    let rounds = segments.iter().map(|(_, mix)| mix.parts.len()).max().unwrap_or(0);
    for round in 0..rounds {
        let mut groups: Vec<(&LoraDelta, Vec<(Range<usize>, f32)>)> = Vec::new();
        for (rows, mix) in &segments {
            let Some((weights, weight)) = mix.parts.get(round) else { continue };
            let Some(delta) = weights.get(layer, module) else { continue };
            match groups.iter_mut().find(|(d, _)| std::ptr::eq(*d, delta)) {
                Some((_, ranges)) => ranges.push((rows.clone(), *weight)),
                None => groups.push((delta, vec![(rows.clone(), *weight)])),
            }
        }
        for (delta, ranges) in groups {
            delta.add_to_rows(&ranges, x, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_matches_explicit_low_rank_product() {
        // in = 3, out = 2, r = 1: A = [1 2 3], B = [[1],[−1]], scale 0.5, weight 2.
        let delta = LoraDelta::new(
            0,
            TargetModule::Q,
            (3, 2, 1),
            0.5,
            vec![1.0, 2.0, 3.0],
            vec![1.0, -1.0],
        )
        .unwrap();
        let x = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0];
        let mut y = [10.0, 10.0, 0.0, 0.0];
        delta.add_to(2.0, &x, &mut y);
        // Row 0: x·Aᵀ = 6, ·1 (=2·0.5) → [6, −6]; row 1: x·Aᵀ = 2 → [2, −2].
        assert_eq!(y, [16.0, 4.0, 2.0, -2.0]);
    }

    #[test]
    fn wrong_factor_sizes_are_refused_with_the_layer_named() {
        let err = LoraDelta::new(4, TargetModule::Down, (3, 2, 2), 1.0, vec![0.0; 5], vec![0.0; 4])
            .unwrap_err();
        assert!(err.to_string().contains("down_proj of layer 4"), "{err}");
    }

    #[test]
    fn mix_sums_weighted_adapters_and_skips_untargeted_layers() {
        let make = |b: f32| {
            let mut w = AdapterWeights::default();
            w.insert(
                1,
                TargetModule::V,
                LoraDelta::new(1, TargetModule::V, (1, 1, 1), 1.0, vec![1.0], vec![b]).unwrap(),
            );
            w
        };
        let (one, two) = (make(1.0), make(2.0));
        let mix = AdapterMix {
            parts: vec![(&one, 0.5), (&two, 3.0)],
        };
        let mut y = [0.0];
        add_batch_deltas(1, TargetModule::V, [(0..1, &mix)], &[2.0], None, &mut y);
        assert_eq!(y, [2.0 * (0.5 * 1.0 + 3.0 * 2.0)]);
        let mut untouched = [7.0];
        add_batch_deltas(0, TargetModule::V, [(0..1, &mix)], &[2.0], None, &mut untouched);
        assert_eq!(untouched, [7.0]);
    }

    #[test]
    fn a_multi_adapter_row_gets_the_same_sum_whatever_the_batch_order() {
        let make = |seed: f32| {
            let mut w = AdapterWeights::default();
            let a: Vec<f32> = (0..6).map(|i| (i as f32 * seed).sin()).collect();
            let b: Vec<f32> = (0..8).map(|i| (i as f32 * seed).cos() * 1e3).collect();
            w.insert(0, TargetModule::Q, LoraDelta::new(0, TargetModule::Q, (3, 4, 2), 0.5, a, b).unwrap());
            w
        };
        let (first, second) = (make(0.37), make(1.91));
        let only_second = AdapterMix { parts: vec![(&second, 1.0)] };
        let both = AdapterMix { parts: vec![(&first, 0.5), (&second, 1.0)] };
        let x: Vec<f32> = (0..6).map(|i| (i as f32 * 0.77).sin() * 1e-3 + 1.0).collect();
        let mut alone = vec![0.1f32; 4];
        add_batch_deltas(0, TargetModule::Q, [(0..1, &both)], &x[3..], None, &mut alone);
        // `second` appears first in this batch; the mixed row must still add `first` first.
        let mut together = vec![0.1f32; 8];
        add_batch_deltas(0, TargetModule::Q, [(0..1, &only_second), (1..2, &both)], &x, None, &mut together);
        assert_eq!(alone, together[4..]);
    }

    #[test]
    fn grouped_rows_get_exactly_what_each_range_gets_alone() {
        let mut w = AdapterWeights::default();
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.3 - 0.7).collect();
        let b: Vec<f32> = (0..8).map(|i| 1.1 - i as f32 * 0.25).collect();
        w.insert(0, TargetModule::Q, LoraDelta::new(0, TargetModule::Q, (3, 4, 2), 0.5, a, b).unwrap());
        let (heavy, light) = (AdapterMix { parts: vec![(&w, 2.0)] }, AdapterMix { parts: vec![(&w, 0.25)] });
        let x: Vec<f32> = (0..12).map(|i| (i as f32).sin()).collect();
        let mut together = vec![1f32; 16];
        add_batch_deltas(0, TargetModule::Q, [(0..1, &heavy), (1..3, &light), (3..4, &heavy)], &x, None, &mut together);
        for (range, mix) in [(0..1, &heavy), (1..3, &light), (3..4, &heavy)] {
            let mut alone = vec![1f32; range.len() * 4];
            add_batch_deltas(0, TargetModule::Q, [(0..range.len(), mix)], &x[range.start * 3..range.end * 3], None, &mut alone);
            assert_eq!(alone, together[range.start * 4..range.end * 4]);
        }
    }

    /// x·Wᵀ for W `[out, in]` row-major.
    fn product(w: &[f32], x: &[f32]) -> Vec<f32> {
        w.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    }

    #[test]
    fn dora_serves_its_rescaled_weight() {
        // W [2, 3], A [1, 3], B [2, 1], s = 0.5, m per row.
        let w = [1.0, 0.0, 2.0, -1.0, 1.0, 0.5];
        let (a, b, m) = ([0.5f32, 1.0, -0.5], [1.0f32, 2.0], [3.0f32, 0.25]);
        let adapted: Vec<f32> = (0..6).map(|i| w[i] + 0.5 * b[i / 3] * a[i % 3]).collect();
        let g: Vec<f32> = adapted.chunks(3).zip(m).map(|(row, m)| m / row.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
        let scaled_b: Vec<f32> = b.iter().zip(&g).map(|(b, g)| b * g).collect();
        let low_rank = LoraDelta::new(0, TargetModule::O, (3, 2, 1), 0.5, a.to_vec(), scaled_b).unwrap();
        let mut weights = AdapterWeights::new(AdapterKind::Dora);
        weights.insert_delta(0, TargetModule::O, ModuleDelta::Dora { low_rank, row_scale: g.clone() });
        let x = [0.25, -1.0, 2.0];
        let mut y = product(&w, &x);
        let mix = AdapterMix { parts: vec![(&weights, 1.0)] };
        add_batch_deltas(0, TargetModule::O, [(0..1, &mix)], &x, None, &mut y);
        let expected: Vec<f32> = product(&adapted, &x).iter().zip(&g).map(|(v, g)| v * g).collect();
        for (got, want) in y.iter().zip(&expected) {
            assert!((got - want).abs() < 1e-3, "{y:?} against {expected:?}");
        }
        // At weight ½ the layer is halfway between W and W′.
        let mut half = product(&w, &x);
        let halfway = AdapterMix { parts: vec![(&weights, 0.5)] };
        add_batch_deltas(0, TargetModule::O, [(0..1, &halfway)], &x, None, &mut half);
        for ((got, base), adapted) in half.iter().zip(product(&w, &x)).zip(&expected) {
            assert!((got - (base + adapted) / 2.0).abs() < 1e-3, "{half:?}");
        }
    }

    #[test]
    fn ia3_scales_outputs_with_their_bias_and_downs_input_on_ups_output() {
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let (l_out, l_in, bias) = ([2.0f32, 0.5], [1.0f32, 0.0, 3.0], [1.0f32, -1.0]);
        let mut weights = AdapterWeights::new(AdapterKind::Ia3);
        weights.insert_delta(0, TargetModule::V, ModuleDelta::ScaleOutput(l_out.to_vec()));
        weights.insert_delta(0, TargetModule::Down, ModuleDelta::ScaleInput(l_in.to_vec()));
        let mix = AdapterMix { parts: vec![(&weights, 1.0)] };
        let none = AdapterMix::default();
        // Two rows, the second without the adapter.
        let x = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let mut y: Vec<f32> = x.chunks(3).flat_map(|row| product(&w, row)).collect();
        add_batch_deltas(0, TargetModule::V, [(0..1, &mix), (1..2, &none)], &x, Some(&bias), &mut y);
        let with_bias: Vec<f32> = y.iter().zip(bias.iter().cycle()).map(|(y, b)| y + b).collect();
        assert_eq!(with_bias, [(6.0 + 1.0) * 2.0, (15.0 - 1.0) * 0.5, 7.0, 14.0]);
        // Alone, the scale on down's input moves to up's finished output: down's input is
        // act(gate) ⊙ up.
        let mut up = x;
        scale_finished_outputs(0, TargetModule::Up, [(0..1, &mix), (1..2, &none)], &mut up);
        assert_eq!(up, [1.0, 0.0, 3.0, 1.0, 1.0, 1.0]);
        let mut down_input = x;
        assert!(!batch_scales_down_inputs(0, [&mix, &none].into_iter()));
        assert!(!scale_down_inputs_in_place(0, [(0..1, &mix), (1..2, &none)], &mut down_input));
        assert_eq!(down_input, x);
    }

    #[test]
    fn ia3_beside_a_low_rank_term_on_down_scales_downs_input_in_place_and_leaves_up_alone() {
        let mut scales = AdapterWeights::new(AdapterKind::Ia3);
        scales.insert_delta(0, TargetModule::Down, ModuleDelta::ScaleInput(vec![2.0, 0.5]));
        let mut low_rank = AdapterWeights::default();
        low_rank.insert(0, TargetModule::Down, LoraDelta::new(0, TargetModule::Down, (2, 1, 1), 1.0, vec![1.0, 1.0], vec![1.0]).unwrap());
        let both = AdapterMix { parts: vec![(&scales, 1.0), (&low_rank, 1.0)] };
        let mut up = [1.0, 1.0];
        scale_finished_outputs(0, TargetModule::Up, [(0..1, &both)], &mut up);
        assert_eq!(up, [1.0, 1.0]);
        let x = [4.0, 4.0];
        let mut scaled = x;
        assert!(batch_scales_down_inputs(0, [&both].into_iter()));
        assert!(scale_down_inputs_in_place(0, [(0..1, &both)], &mut scaled));
        assert_eq!(scaled, [8.0, 2.0]);
        // The low-rank term reads the input as it came: 4 + 4, not 8 + 2.
        let mut y = [0.0];
        add_batch_deltas(0, TargetModule::Down, [(0..1, &both)], &x, None, &mut y);
        assert_eq!(y, [8.0]);
    }
}
