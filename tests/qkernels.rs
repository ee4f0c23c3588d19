//! Our quantized kernels (`surgery::model::qkernels`, issue 22) against ggml's rule written here
//! from the GGUF spec and ggml's x86 kernels, and against candle-core's `k_quants`, which the
//! model used before them: bit for bit, on random blocks, for odd row counts and several widths,
//! on every instruction set this CPU runs (the scalar fallback included).

use std::borrow::Cow;

use candle_core::quantized::GgmlDType;
use half::f16;
use surgery::model::qkernels::{quantize_row_q8_0, Isa, Kind, QMatrix};
use surgery::synth::SplitMix64;

/// Random blocks of `kind`: f16 scales over several magnitudes, any quant byte (-128 included).
fn random_blocks(kind: Kind, blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64(seed);
    let mut bytes = Vec::with_capacity(blocks * kind.block_bytes());
    for _ in 0..blocks {
        let scale = rng.uniform() * 10f32.powi((rng.uniform() * 6.0) as i32 - 4);
        bytes.extend(f16::from_f32(scale).to_le_bytes());
        for _ in 2..kind.block_bytes() {
            bytes.push((rng.uniform() * 256.0) as u8);
        }
    }
    bytes
}

/// Activations of `m` rows: each row its own magnitude, a few exact zeros and ties.
fn random_activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..m * k)
        .map(|i| {
            let scale = 10f32.powi((i / k) as i32 % 5 - 2);
            match i % 53 {
                0 => 0.0,
                1 => 2.5 * scale,
                _ => (rng.uniform() * 2.0 - 1.0) * scale,
            }
        })
        .collect()
}

/// ggml's `quantize_row_q8_0` (the reference one): d = amax / 127 stored as f16, each value
/// round(x * (1 / d)) half away from zero. Returns (d as f32, values) per block.
fn reference_q8_0(x: &[f32]) -> Vec<(f32, [i32; 32])> {
    x.chunks_exact(32)
        .map(|b| {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = std::array::from_fn(|i| (b[i] * id).round() as i32);
            (f16::from_f32(d).to_f32(), q)
        })
        .collect()
}

/// A weight block's (d, values) from the spec: Q8_0 signed bytes; Q4_0 low nibbles are values
/// 0..16 and high nibbles 16..32, each minus 8.
fn reference_weight(kind: Kind, b: &[u8]) -> (f32, [i32; 32]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let q = std::array::from_fn(|i| match kind {
        Kind::Q8_0 => i32::from(b[2 + i] as i8),
        Kind::Q4_0 if i < 16 => i32::from(b[2 + i] & 15) - 8,
        Kind::Q4_0 => i32::from(b[2 + i - 16] >> 4) - 8,
    });
    (d, q)
}

/// ggml's x86 `vec_dot`: per block, lane j holds the integer sum of products 4j..4j+4 and
/// accumulates fma(d_w * d_a, lane, acc); then `hsum_float_8`.
fn reference_dot(kind: Kind, w_row: &[u8], acts: &[(f32, [i32; 32])]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, (da, qa)) in w_row.chunks_exact(kind.block_bytes()).zip(acts) {
        let (dw, qw) = reference_weight(kind, wb);
        for (j, acc) in acc.iter_mut().enumerate() {
            let lane: i32 = (4 * j..4 * j + 4).map(|i| qw[i] * qa[i]).sum();
            *acc = (dw * da).mul_add(lane as f32, *acc);
        }
    }
    let r: [f32; 4] = std::array::from_fn(|i| acc[i + 4] + acc[i]);
    (r[0] + r[2]) + (r[1] + r[3])
}

/// (m, k) x (n, k)^T by [`reference_dot`].
fn reference(kind: Kind, w: &[u8], x: &[f32], k: usize) -> Vec<f32> {
    let row_bytes = k / 32 * kind.block_bytes();
    x.chunks_exact(k)
        .flat_map(|xr| {
            let acts = reference_q8_0(xr);
            w.chunks_exact(row_bytes)
                .map(move |wr| reference_dot(kind, wr, &acts))
        })
        .collect()
}

/// candle-core's `k_quants::matmul` on the same bytes (what the model ran before).
fn candle(kind: Kind, w: &[u8], x: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    let dtype = match kind {
        Kind::Q8_0 => GgmlDType::Q8_0,
        Kind::Q4_0 => GgmlDType::Q4_0,
    };
    let mut out = vec![0f32; m * n];
    dtype
        .from_data(Cow::Borrowed(w))
        .matmul_t((m, k, n), x, &mut out)
        .unwrap();
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_kernel_is_ggml_rule_bit_for_bit() {
    let isas = Isa::available();
    assert!(isas.contains(&Isa::Scalar), "the fallback is always there");
    println!("instruction sets tested: {isas:?}");
    let mut seed = 1;
    for kind in [Kind::Q8_0, Kind::Q4_0] {
        for (n, k) in [(1, 32), (3, 64), (5, 96), (13, 576), (37, 160), (67, 1536)] {
            for m in [1, 2, 7, 19] {
                seed += 1;
                let w = random_blocks(kind, n * k / 32, seed);
                let x = random_activations(m, k, seed + 1000);
                let want = bits(&reference(kind, &w, &x, k));
                let matrix = QMatrix::new(kind, &w, n, k).unwrap();
                for &isa in &isas {
                    let got = matrix.matmul_t_on(isa, &x, m).unwrap();
                    assert_eq!(
                        bits(&got),
                        want,
                        "{kind:?} {isa:?} ({m}, {k}) x ({n}, {k})^T"
                    );
                }
                let theirs = candle(kind, &w, &x, (m, k, n));
                assert_eq!(bits(&theirs), want, "candle {kind:?} ({m},{k},{n})");
            }
        }
    }
}

#[test]
fn activations_round_as_the_reference() {
    let x = random_activations(3, 256, 77);
    for row in x.chunks(256) {
        let ours = quantize_row_q8_0(row);
        let want = reference_q8_0(row);
        for (b, (d, q)) in want.iter().enumerate() {
            assert_eq!(ours.d[b].to_bits(), d.to_bits());
            let qs: Vec<i32> = ours.qs[b].iter().map(|&v| i32::from(v)).collect();
            assert_eq!(&qs[..], &q[..]);
        }
    }
}

#[test]
fn dequantize_is_candles() {
    for kind in [Kind::Q8_0, Kind::Q4_0] {
        let w = random_blocks(kind, 6 * 3, 5);
        let ours = QMatrix::new(kind, &w, 6, 96).unwrap().dequantize();
        let dtype = match kind {
            Kind::Q8_0 => GgmlDType::Q8_0,
            Kind::Q4_0 => GgmlDType::Q4_0,
        };
        let candle_core::CpuStorage::F32(theirs) = dtype
            .from_data(Cow::Borrowed(&w))
            .dequantize(6 * 96)
            .unwrap()
        else {
            panic!("f32 expected")
        };
        assert_eq!(bits(&ours), bits(&theirs), "{kind:?}");
    }
}
