//! The kernels in plain Rust, for CPUs without AVX2: lane by lane, the same integer sums and
//! the same float operations in the same order as the vector kernels, so all agree bit for bit.

use super::layout::{decode, SoftHalf};
use super::{Scratch, Unit, BLOCK, CHUNK, TILE_ROWS};

pub(super) fn run(unit: &Unit, scratch: &mut Scratch) {
    let (weight, x) = (unit.weight, unit.x);
    let (format, k) = (weight.format, weight.k);
    let (sub, zero, blocks_per_row) = (format.sub_block(), format.zero(), k / BLOCK);
    let tile_row = weight.tile_row(unit.tile_row);
    let Scratch { decoded, sums } = scratch;
    let acc = &mut sums[..unit.rows.len()];
    acc.fill([0.0; TILE_ROWS]);
    for t0 in (0..k).step_by(CHUNK) {
        let len = CHUNK.min(k - t0);
        // SAFETY: the portable conversion runs anywhere.
        let view = unsafe { decode::<SoftHalf>(format, &weight.planes, tile_row, t0, len, decoded) };
        // SAFETY: the view's codes hold `len` values × 16 rows.
        let codes = unsafe { std::slice::from_raw_parts(view.codes, len * TILE_ROWS) };
        for (row, sums) in unit.rows.clone().zip(acc.iter_mut()) {
            for b in 0..len / BLOCK {
                let kb = t0 / BLOCK + b;
                let dx = x.scale[row * blocks_per_row + kb];
                for s in 0..BLOCK / sub {
                    let runs = &x.run_sum[(row * blocks_per_row + kb) * 2..][..2];
                    let start = -zero * if sub == 16 { runs[s] } else { runs[0] + runs[1] };
                    let first = b * BLOCK + s * sub;
                    let activations = &x.q[row * k + t0 + first..][..sub];
                    let scales = &decoded.scales[(b * BLOCK / sub + s) * TILE_ROWS..][..TILE_ROWS];
                    for (lane, (sum, &scale)) in sums.iter_mut().zip(scales).enumerate() {
                        let mut isum = start;
                        for (t, &a) in activations.iter().enumerate() {
                            let t = first + t;
                            isum += codes[t / 4 * 64 + lane * 4 + t % 4] as i32 * a as i32;
                        }
                        *sum = (isum as f32).mul_add(scale * dx, *sum);
                    }
                }
                if format.has_mins() {
                    let block_sum = x.block_sum[row * blocks_per_row + kb];
                    for (sum, &min) in sums.iter_mut().zip(&decoded.mins[b * TILE_ROWS..][..TILE_ROWS]) {
                        *sum = (-min).mul_add(block_sum, *sum);
                    }
                }
            }
        }
    }
    for (i, sums) in acc.iter().enumerate() {
        // SAFETY: the unit owns these `lanes` outputs of each of its rows.
        unsafe { std::ptr::copy_nonoverlapping(sums.as_ptr(), unit.output(i), unit.lanes) };
    }
}
