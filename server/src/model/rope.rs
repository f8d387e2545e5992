//! Rotary position embedding. Each rotated pair (x_a, x_b) of a head at position p turns by
//! θ_i·p:  (x_a, x_b) ↦ (x_a·cos − x_b·sin, x_b·cos + x_a·sin),
//! where the pairs are (2i, 2i+1) in the interleaved style and (i, i + dims/2) in NeoX's, for
//! i < dims/2. Dimensions past `dims` are left as they are.

use crate::model::config::{Config, RopeStyle};

/// The distinct frequency sets of a model's layers (Gemma 3: a local and a global one; other
/// families: one), worked out once at load, so a forward pass builds each set's tables once.
pub struct RopePlan {
    sets: Vec<Vec<f32>>,
    set_of_layer: Vec<usize>,
    style: RopeStyle,
}

impl RopePlan {
    pub fn new(config: &Config) -> Self {
        let mut sets: Vec<Vec<f32>> = Vec::new();
        let set_of_layer = (0..config.n_layers)
            .map(|layer| {
                let frequencies = config.rope_frequencies(layer);
                sets.iter().position(|s| *s == frequencies).unwrap_or_else(|| {
                    sets.push(frequencies);
                    sets.len() - 1
                })
            })
            .collect();
        Self { sets, set_of_layer, style: config.rope.style }
    }

    /// Each frequency set's tables at `positions`, in set order.
    pub fn tables(&self, positions: &[usize]) -> Vec<RotaryTables> {
        self.sets.iter().map(|f| RotaryTables::new(positions, f, self.style)).collect()
    }

    /// Which of [`RopePlan::tables`] `layer` rotates with.
    pub fn set_of(&self, layer: usize) -> usize {
        self.set_of_layer[layer]
    }
}

/// cos and sin of θ_i·p for each row's position p: `[rows, dims/2]` each.
pub struct RotaryTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    style: RopeStyle,
}

impl RotaryTables {
    /// `inverse_frequencies`: θ_i per unit of position (see `Config::rope_frequencies`).
    pub fn new(positions: &[usize], inverse_frequencies: &[f32], style: RopeStyle) -> Self {
        let half = inverse_frequencies.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inverse_frequencies {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half, style }
    }

    /// Rotates one head of row `row` in place by +θ (`sign` 1) or −θ (`sign` −1, the backward
    /// pass: a rotation's transpose is its inverse).
    pub fn rotate(&self, row: usize, head: &mut [f32], sign: f32) {
        let cos = &self.cos[row * self.half..(row + 1) * self.half];
        let sin = &self.sin[row * self.half..(row + 1) * self.half];
        match self.style {
            RopeStyle::NeoX => {
                let (first, second) = head[..2 * self.half].split_at_mut(self.half);
                for (((a, b), &c), &s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
                    let s = sign * s;
                    let (x, y) = (*a, *b);
                    *a = x * c - y * s;
                    *b = y * c + x * s;
                }
            }
            RopeStyle::Interleaved => {
                for ((pair, &c), &s) in head[..2 * self.half].chunks_exact_mut(2).zip(cos).zip(sin) {
                    let s = sign * s;
                    let (x, y) = (pair[0], pair[1]);
                    pair[0] = x * c - y * s;
                    pair[1] = y * c + x * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_pair_different_dimensions_and_leave_the_rest() {
        // One frequency of a quarter turn: the rotated pair swaps with a sign, the rest stays.
        let tables = RotaryTables::new(&[1], &[std::f32::consts::FRAC_PI_2], RopeStyle::NeoX);
        let mut head = [1.0, 2.0, 3.0, 4.0];
        tables.rotate(0, &mut head[..], 1.0);
        // NeoX with dims 2 over a 4-wide head pairs (0, 1) as (i, i + 1).
        assert!((head[0] + 2.0).abs() < 1e-6 && (head[1] - 1.0).abs() < 1e-6, "{head:?}");
        assert_eq!(&head[2..], &[3.0, 4.0]);

        let tables = RotaryTables::new(&[1], &[std::f32::consts::FRAC_PI_2, 0.0], RopeStyle::Interleaved);
        let mut head = [1.0, 2.0, 3.0, 4.0];
        tables.rotate(0, &mut head[..], 1.0);
        assert!((head[0] + 2.0).abs() < 1e-6 && (head[1] - 1.0).abs() < 1e-6, "{head:?}");
        assert_eq!(&head[2..], &[3.0, 4.0]);

        let tables = RotaryTables::new(&[1], &[std::f32::consts::FRAC_PI_2, 0.0], RopeStyle::NeoX);
        let mut head = [1.0, 2.0, 3.0, 4.0];
        tables.rotate(0, &mut head[..], 1.0);
        // NeoX pairs (0, 2) and (1, 3).
        assert!((head[0] + 3.0).abs() < 1e-6 && (head[2] - 1.0).abs() < 1e-6, "{head:?}");
        assert_eq!((head[1], head[3]), (2.0, 4.0));
    }

    #[test]
    fn the_inverse_rotation_undoes_it() {
        let tables = RotaryTables::new(&[7], &[0.3, 0.01], RopeStyle::Interleaved);
        let original = [0.5, -1.0, 2.0, 0.25];
        let mut head = original;
        tables.rotate(0, &mut head[..], 1.0);
        tables.rotate(0, &mut head[..], -1.0);
        for (a, b) in head.iter().zip(original) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
