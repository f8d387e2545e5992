use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;

const FORMATS: [(GgmlDType, Format); 4] =
    [(GgmlDType::Q8_0, Format::Q8_0), (GgmlDType::Q5_0, Format::Q5_0), (GgmlDType::Q4K, Format::Q4K), (GgmlDType::Q6K, Format::Q6K)];

/// A weight `[n, k]` quantized by candle (ggml's reference quantizers): its bytes and its
/// dequantized values.
fn quantized(dtype: GgmlDType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let values: Vec<f32> = (0..n * k).map(|i| (((i * 7919) % 251) as f32 - 110.0) / 300.0 * if i % 37 == 0 { 3.0 } else { 1.0 }).collect();
    let q = QTensor::quantize(&Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
    let w = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    (q.data().unwrap().into_owned(), w)
}

/// Gemma-like activations: mostly small, a few large outliers.
fn activations(m: usize, k: usize) -> Vec<f32> {
    (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 20.0 * if i % 89 == 0 { 300.0 } else { 1.0 }).collect()
}

fn isas() -> Vec<Isa> {
    [Isa::Avx512Vnni, Isa::Avx2, Isa::Portable].into_iter().filter(|isa| isa.runs_here()).collect()
}

#[test]
fn every_row_dequantizes_to_exactly_what_ggml_makes_of_the_file() {
    // 37 rows: a partial last tile row.
    let (n, k) = (37, 512);
    for (dtype, format) in FORMATS {
        let (bytes, w) = quantized(dtype, n, k);
        for isa in isas() {
            let weight = QuantWeight::from_file(format, &bytes, n, k, isa, &TileArena::default(), |_| {}).unwrap();
            let mut out = vec![0f32; n * k];
            weight.dequantize_rows_into(0..n, &mut out);
            assert_eq!(out, w, "{format:?} {isa:?}");
            let mut some = vec![0f32; 5 * k];
            weight.dequantize_rows_into(14..19, &mut some);
            assert_eq!(some, w[14 * k..19 * k], "{format:?} {isa:?} rows 14..19");
        }
    }
}

#[test]
fn a_matrix_of_many_slabs_is_retiled_slab_by_slab_and_releases_every_byte_once() {
    // Two full slabs and a partial one, its last tile row partial too.
    let (n, k) = (2 * 8192 + 37, 32);
    let (bytes, w) = quantized(GgmlDType::Q8_0, n, k);
    let mut released = Vec::new();
    let weight = QuantWeight::from_file(Format::Q8_0, &bytes, n, k, Isa::Portable, &TileArena::default(), |read| released.push(read)).unwrap();
    assert_eq!(released.len(), 3);
    assert_eq!(released.iter().map(|r| r.len()).sum::<usize>(), bytes.len());
    assert!(released.windows(2).all(|w| w[0].end == w[1].start), "{released:?}");
    let mut out = vec![0f32; n * k];
    weight.dequantize_rows_into(0..n, &mut out);
    assert_eq!(out, w);
}

#[test]
fn weights_stay_at_the_files_bits_per_weight() {
    let (n, k) = (256, 1024);
    for (dtype, format) in FORMATS {
        let (bytes, _) = quantized(dtype, n, k);
        let weight = QuantWeight::from_file(format, &bytes, n, k, Isa::Portable, &TileArena::default(), |_| {}).unwrap();
        let bits = weight.resident_bytes() as f64 * 8.0 / (n * k) as f64;
        let file_bits = bytes.len() as f64 * 8.0 / (n * k) as f64;
        assert!(bits <= file_bits * 1.03, "{format:?}: {bits} bits per weight against the file's {file_bits}");
    }
}

/// The product equals, to f32 rounding, the exact product of the dequantized weight with the
/// 8-bit-rounded activations; every kernel this CPU runs gives the same bits, and a row gives
/// the same bits alone as in a batch of 70 (two row groups, partial passes).
#[test]
fn every_kernel_computes_the_product_of_the_quantized_operands_bit_for_bit_alike() {
    let (n, k, m) = (45, 768, 70);
    for (dtype, format) in FORMATS {
        let (n, k) = if format == Format::Q4K || format == Format::Q6K { (n, k) } else { (n, 640) };
        let x = activations(m, k);
        let qx = &QuantizedRows::quantize(&x, k, format.activation_format());
        let (bytes, w) = quantized(dtype, n, k);
        let mut results = Vec::new();
        for isa in isas() {
            let weight = QuantWeight::from_file(format, &bytes, n, k, isa, &TileArena::default(), |_| {}).unwrap();
            let mut y = vec![f32::NAN; m * n];
            weight.matmul_rows_on_this_thread(qx, 0..n, &mut y);
            for i in [0, 13, 64, 69] {
                let alone = QuantizedRows::quantize(&x[i * k..(i + 1) * k], k, format.activation_format());
                let mut y_alone = vec![0f32; n];
                weight.matmul_rows_on_this_thread(&alone, 0..n, &mut y_alone);
                assert_eq!(y_alone, y[i * n..(i + 1) * n], "{format:?} {isa:?}: row {i} alone");
            }
            results.push((isa, y));
        }
        let (_, y) = &results[0];
        for (isa, other) in &results[1..] {
            assert_eq!(other, y, "{format:?}: {isa:?} against {:?}", results[0].0);
        }
        let kb = k / BLOCK;
        for i in 0..m {
            for j in 0..n {
                let rounded: f64 = (0..k).map(|t| qx.scale[i * kb + t / BLOCK] as f64 * qx.q[i * k + t] as f64 * w[j * k + t] as f64).sum();
                let magnitude: f64 = (0..k).map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs()).sum();
                let got = y[i * n + j] as f64;
                assert!((got - rounded).abs() <= 2e-6 * magnitude + 1e-6, "{format:?} ({i},{j}): {got} vs {rounded}");
            }
        }
    }
}

/// Codes at their format's extremes against activations at ±127 everywhere: the kernels' 16-bit
/// partial sums are at their largest, and must still give the exact product (a saturated sum
/// would be off by thousands of units of the scale). Each block's first weight has the sign
/// opposite to the rest, so the quantizer's scale takes it as the extreme and gives the rest the
/// other end of the code range.
#[test]
fn codes_at_their_extremes_sum_without_saturating() {
    let (n, k) = (16, 512);
    for (dtype, format) in FORMATS {
        for sign in [1.0f32, -1.0] {
            let values: Vec<f32> = (0..n * k).map(|i| if i % BLOCK == 0 { -sign } else { sign }).collect();
            let q = QTensor::quantize(&Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
            let w: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let bytes = q.data().unwrap().into_owned();
            for (m, x_sign) in [(1, 1.0f32), (3, -1.0), (8, 1.0), (8, -1.0)] {
                let x = vec![x_sign; m * k];
                let qx = QuantizedRows::quantize(&x, k, format.activation_format());
                for isa in isas() {
                    let weight = QuantWeight::from_file(format, &bytes, n, k, isa, &TileArena::default(), |_| {}).unwrap();
                    let mut y = vec![f32::NAN; m * n];
                    weight.matmul_rows_on_this_thread(&qx, 0..n, &mut y);
                    for (i, j) in (0..m).flat_map(|i| (0..n).map(move |j| (i, j))) {
                        let exact: f64 = (0..k).map(|t| qx.scale[i * (k / BLOCK) + t / BLOCK] as f64 * qx.q[i * k + t] as f64 * w[j * k + t] as f64).sum();
                        let got = y[i * n + j] as f64;
                        assert!((got - exact).abs() <= 1e-4 * exact.abs().max(1.0), "{format:?} {isa:?} sign {sign} rows {m}: ({i},{j}) {got} vs {exact}");
                    }
                }
            }
        }
    }
}

/// Up to `FUSED_ROWS` activation rows are multiplied from the planes in place; they give the
/// portable kernel's bits, and those of the same rows in a batch whose first row group
/// decodes, over k of several 256-value chunks (a partial one for Q8_0 and Q5_0) and a partial
/// last tile row. The batch's last rows, a unit of their own, go in place from row 64 on.
#[test]
fn few_rows_multiplied_in_place_give_the_bits_of_the_decoding_kernels() {
    let n = 37;
    for (dtype, format) in FORMATS {
        let k = if format.file_block().0 == CHUNK { 1280 } else { 1248 };
        let (bytes, _) = quantized(dtype, n, k);
        let x = activations(ROW_GROUP + FUSED_ROWS, k);
        let product = |isa, rows: std::ops::Range<usize>| {
            let weight = QuantWeight::from_file(format, &bytes, n, k, isa, &TileArena::default(), |_| {}).unwrap();
            let qx = QuantizedRows::quantize(&x[rows.start * k..rows.end * k], k, format.activation_format());
            let mut y = vec![f32::NAN; rows.len() * n];
            weight.matmul_rows_on_this_thread(&qx, 0..n, &mut y);
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for m in 1..=FUSED_ROWS {
            let (first, last) = (0..m, ROW_GROUP..ROW_GROUP + m);
            let (portable_first, portable_last) = (product(Isa::Portable, first.clone()), product(Isa::Portable, last.clone()));
            for isa in isas() {
                assert_eq!(product(isa, first.clone()), portable_first, "{format:?} {isa:?}: {m} rows against the portable kernel");
                assert_eq!(product(isa, last.clone()), portable_last, "{format:?} {isa:?}: {m} rows against the portable kernel");
                let batch = product(isa, 0..ROW_GROUP + m);
                assert_eq!(batch[..m * n], portable_first, "{format:?} {isa:?}: {m} rows decoded in a batch");
                assert_eq!(batch[ROW_GROUP * n..], portable_last, "{format:?} {isa:?}: {m} rows after a row group");
            }
        }
    }
}

#[test]
fn a_range_of_weight_rows_and_a_partial_last_tile_write_only_their_outputs() {
    let (n, k, m) = (45, 256, 3);
    let (bytes, _) = quantized(GgmlDType::Q4K, n, k);
    let x = QuantizedRows::quantize(&activations(m, k), k, Format::Q4K.activation_format());
    for isa in isas() {
        let weight = QuantWeight::from_file(Format::Q4K, &bytes, n, k, isa, &TileArena::default(), |_| {}).unwrap();
        let mut all = vec![0f32; m * n];
        weight.matmul_rows_on_this_thread(&x, 0..n, &mut all);
        // The serving workers' split gives the same bits.
        let served = weight.matmul(&activations(m, k));
        assert_eq!(served, all, "{isa:?}: on the serving workers");
        // A guard value after y must survive.
        let rows = 16..n;
        let mut y = vec![7f32; m * rows.len() + 1];
        weight.matmul_rows_on_this_thread(&x, rows.clone(), &mut y[..m * rows.len()]);
        assert_eq!(y[m * rows.len()], 7.0, "{isa:?}");
        for i in 0..m {
            assert_eq!(y[i * rows.len()..(i + 1) * rows.len()], all[i * n + 16..(i + 1) * n], "{isa:?} row {i}");
        }
    }
}

#[test]
fn data_that_does_not_fit_the_shape_is_refused() {
    let (bytes, _) = quantized(GgmlDType::Q8_0, 48, 96);
    assert!(QuantWeight::from_file(Format::Q8_0, &bytes, 40, 96, Isa::Portable, &TileArena::default(), |_| {}).is_none());
    assert!(QuantWeight::from_file(Format::Q8_0, &bytes[..100], 48, 96, Isa::Portable, &TileArena::default(), |_| {}).is_none());
    assert!(QuantWeight::from_file(Format::Q6K, &bytes, 48, 96, Isa::Portable, &TileArena::default(), |_| {}).is_none());
}

#[test]
fn weights_multiplied_together_give_each_one_its_own_product() {
    // Every format at once: two activation formats, partial last tile rows, many units.
    let (m, k) = (19, 512);
    let x = activations(m, k);
    for isa in isas() {
        let weights: Vec<QuantWeight> = FORMATS
            .iter()
            .zip([37, 64, 21, 50])
            .map(|(&(dtype, format), n)| QuantWeight::from_file(format, &quantized(dtype, n, k).0, n, k, isa, &TileArena::default(), |_| {}).unwrap())
            .collect();
        let together = QuantWeight::matmul_each(&weights.iter().collect::<Vec<_>>(), &x);
        assert_eq!(together.len(), weights.len());
        for (weight, y) in weights.iter().zip(&together) {
            assert_eq!(*y, weight.matmul(&x), "{:?} {isa:?}", weight.format);
        }
    }
}
