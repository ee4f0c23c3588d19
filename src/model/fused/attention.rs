//! Causal grouped-query attention, fused (issue 16, DESIGN decision 12): one candle `CustomOp3`
//! over q [B, H, T, D], k and v [B, KV, Tk, D] (query head i reads key-value head i / (H / KV),
//! scores scaled by 1/sqrt(D)), with its own backward. Flash-style (Dao, "FlashAttention-2",
//! algorithms 1 and 2): tiles of queries against tiles of keys with an online softmax, keeping only
//! each row's softmax statistics for the backward, which recomputes the scores tile by tile. The
//! statistics are the max and the inverse sum of exp(score - max) rather than their log-sum-exp:
//! a row with every key masked has scores near -1e9, where max + ln(sum) would round the ln away
//! in f32 (the composed op gives such a row uniform weights, and so must the backward). Nothing of
//! size [B, H, T, Tk] is ever held: the composed op keeps several such tensors per block for its
//! backward, the main part of the trainer's memory.
//!
//! [`composed`] is the same attention from differentiable candle ops: the reference the fused op is
//! proved against (tests/fused_attention.rs), and the path on other devices and dtypes.
//!
//! Threads: the forward runs one rayon task per (batch, head, query tile); the backward one per
//! (batch, head, share of the query tiles), each with its own dK and dV rows, summed afterwards
//! over the query heads that share a key-value head. Within a task, each tile's products (S = Q
//! K^T and O += P V forward; S again, dV += P^T dO, dP = dO V^T, dQ += dS K and dK += dS^T Q
//! backward) are `gemm` calls on the calling thread; the softmax between them runs row by row in
//! loops built for AVX2 where the CPU has it, with a vectorizable exp.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::super::block::softmax;
use super::{avx2, matmul_here, Float, Mat, LANES};

/// Query rows per tile. With [`KEY_TILE`] keys, a tile's working set at D = 64 in f32 (queries
/// and outputs 16 KiB each, keys and values 32 KiB each, scores 32 KiB) stays within L2. Of the
/// sizes 32 and 64 by 64 and 128 (`examples/attention.rs`, SmolLM2's shapes at T = 256 and 512),
/// 64 by 128 was fastest: the products are `gemm` calls, and larger ones amortize its set-up.
const QUERY_TILE: usize = 64;
/// Key rows per tile.
const KEY_TILE: usize = 128;
/// The additive bias of a masked key in the model's bias tensor (`positions_and_bias`).
const MASKED: f64 = -1e9;

/// Which keys each query reads.
#[derive(Clone)]
pub enum Mask {
    /// An additive bias [B, 1, T, Tk], added to the scaled scores as the composed op does.
    Bias(Tensor),
    /// Causal after `past` earlier keys (query i sees keys 0..=past + i, Tk = past + T), and of
    /// those only the real ones: `valid` [B * Tk], true for a real token. Equal to the bias
    /// 0 / -1e9 built from the same facts, a row with no real key included: the bias form then
    /// adds -1e9 to every key, and so does this one.
    Causal { past: usize, valid: Arc<[bool]> },
}

/// Whether the fused op serves tensors like `q`: on the CPU, in f32 or f64.
pub(crate) fn applies(q: &Tensor) -> bool {
    q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64)
}

/// softmax(q k^T / sqrt(D) + bias) v from differentiable candle ops, the key-value heads repeated
/// for grouped-query attention: q [B, H, T, D], k and v [B, KV, Tk, D], bias [B, 1, T, Tk] ->
/// [B, H, T, D]. Keeps [B, H, T, Tk] tensors for the backward.
pub fn composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (b, nh, _, hd) = q.dims4()?;
    let (_, nkv, keys, _) = k.dims4()?;
    // Grouped-query attention: query head i reads key-value head i / (nh / nkv).
    let repeat = |x: &Tensor| -> candle_core::Result<Tensor> {
        if nh == nkv {
            return Ok(x.clone());
        }
        x.unsqueeze(2)?
            .broadcast_as((b, nkv, nh / nkv, keys, hd))?
            .reshape((b, nh, keys, hd))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    // (B, H, T, D) @ (B, H, D, Tk) -> (B, H, T, Tk)
    let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(bias)?;
    // (B, H, T, Tk) @ (B, H, Tk, D) -> (B, H, T, D)
    softmax(&scores)?.matmul(&v.contiguous()?)
}

/// The fused attention: q [B, H, T, D], k and v [B, KV, Tk, D] on the CPU in f32 or f64 ->
/// [B, H, T, D], differentiable in q, k and v.
pub fn fused(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask) -> candle_core::Result<Tensor> {
    let dims = Dims::of(q.dims(), k.dims(), v.dims())?;
    if !applies(q) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Err(candle_core::Error::Msg(format!(
            "fused attention runs on the CPU in f32 or f64, not {:?} {:?}",
            q.device().location(),
            q.dtype()
        )));
    }
    dims.check_mask(mask)?;
    let op = FlashAttention {
        mask: mask.clone(),
        stats: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    b: usize,
    /// Query heads.
    h: usize,
    /// Key-value heads.
    kv: usize,
    /// Queries per batch row.
    t: usize,
    /// Keys per batch row.
    tk: usize,
    /// Head dimension.
    d: usize,
}

impl Dims {
    fn of(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        let bad = || {
            candle_core::Error::Msg(format!(
                "fused attention wants q [B, H, T, D], k and v [B, KV, Tk, D] with H a multiple \
                 of KV, got q {q:?}, k {k:?}, v {v:?}"
            ))
        };
        let (&[b, h, t, d], &[kb, kv, tk, kd]) = (q, k) else {
            return Err(bad());
        };
        if k != v || kb != b || kd != d || d == 0 || kv == 0 || h % kv != 0 || tk == 0 {
            return Err(bad());
        }
        Ok(Dims { b, h, kv, t, tk, d })
    }

    fn check_mask(&self, mask: &Mask) -> candle_core::Result<()> {
        let ok = match mask {
            Mask::Bias(bias) => bias.dims() == [self.b, 1, self.t, self.tk],
            Mask::Causal { past, valid } => {
                past + self.t == self.tk && valid.len() == self.b * self.tk
            }
        };
        if ok {
            return Ok(());
        }
        let got = match mask {
            Mask::Bias(bias) => format!("a bias of shape {:?}", bias.dims()),
            Mask::Causal { past, valid } => {
                format!(
                    "a causal mask of {past} past keys and {} flags",
                    valid.len()
                )
            }
        };
        Err(candle_core::Error::Msg(format!(
            "fused attention over {} queries and {} keys in {} rows got {got}",
            self.t, self.tk, self.b
        )))
    }

    /// Query heads per key-value head.
    fn group(&self) -> usize {
        self.h / self.kv
    }
}

/// The op, built once per call: it carries the mask, and from its forward to its backward the
/// softmax statistics of every query row [B, H, T] (f64 holds f32 ones exactly).
struct FlashAttention {
    mask: Mask,
    stats: Mutex<Option<Vec<[f64; 2]>>>,
}

/// a . b over equal lengths.
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (a_blocks, a_rest) = a.as_chunks::<LANES>();
    let (b_blocks, b_rest) = b.as_chunks::<LANES>();
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        for ((acc, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    let mut tail = T::zero();
    for (&x, &y) in a_rest.iter().zip(b_rest) {
        tail += x * y;
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)) + tail
}

/// y += alpha x over equal lengths.
#[inline(always)]
fn axpy<T: Float>(alpha: T, x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// The mask resolved for the kernels: per query row, the keys to visit and the bias of each.
enum Keys<T> {
    /// [B, T, Tk], added as it is.
    Bias(Vec<T>),
    Causal {
        past: usize,
        /// [B, Tk]
        valid: Arc<[bool]>,
        /// [B, T]: rows with no real key among those they may see.
        dead: Vec<bool>,
    },
}

impl<T: Float> Keys<T> {
    fn new(mask: &Mask, dims: &Dims) -> candle_core::Result<Keys<T>> {
        Ok(match mask {
            Mask::Bias(bias) => Keys::Bias(bias.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1()?),
            Mask::Causal { past, valid } => {
                let mut dead = Vec::with_capacity(dims.b * dims.t);
                for row in valid.chunks(dims.tk) {
                    // Query i sees keys 0..=past + i: dead while none of those is real.
                    let first = row.iter().position(|&v| v).unwrap_or(dims.tk);
                    dead.extend((0..dims.t).map(|i| first > past + i));
                }
                Keys::Causal {
                    past: *past,
                    valid: valid.clone(),
                    dead,
                }
            }
        })
    }

    /// The keys the queries `rows` of batch row `b` visit: 0..end (later ones are all masked,
    /// unless a row is dead, which reads every key as the bias form does).
    fn end(&self, dims: &Dims, b: usize, rows: &Range<usize>) -> usize {
        match self {
            Keys::Bias(_) => dims.tk,
            Keys::Causal { past, dead, .. } => {
                if dead[b * dims.t + rows.start..b * dims.t + rows.end].contains(&true) {
                    dims.tk
                } else {
                    (past + rows.end).min(dims.tk)
                }
            }
        }
    }

    /// scale s + bias in place, for the raw scores `s` of query `i` of batch row `b` against keys
    /// j0..: -inf for a key it must not read (its weight is then exactly the 0 that
    /// exp(-1e9 - max) gives).
    #[inline(always)]
    fn scale_and_mask(&self, dims: &Dims, b: usize, i: usize, j0: usize, scale: T, s: &mut [T]) {
        match self {
            Keys::Bias(bias) => {
                let at = (b * dims.t + i) * dims.tk + j0;
                let bias = &bias[at..at + s.len()];
                for (x, &bias) in s.iter_mut().zip(bias) {
                    *x = scale * *x + bias;
                }
            }
            Keys::Causal { past, valid, dead } => {
                if dead[b * dims.t + i] {
                    let masked = T::from_f64(MASKED);
                    s.iter_mut().for_each(|x| *x = scale * *x + masked);
                    return;
                }
                let valid = &valid[b * dims.tk + j0..b * dims.tk + j0 + s.len()];
                for (c, (x, &real)) in s.iter_mut().zip(valid).enumerate() {
                    let seen = j0 + c <= past + i;
                    *x = if seen && real {
                        scale * *x
                    } else {
                        T::NEG_INFINITY
                    };
                }
            }
        }
    }
}

/// A method `$name` that runs `$body` (an `#[inline(always)]` method of the same arguments)
/// compiled for AVX2 and FMA where the CPU has them ([`avx2`]), and for the build's baseline
/// elsewhere; `$avx2` is the AVX2 build.
macro_rules! avx2_dispatch {
    (
        $(#[$doc:meta])*
        fn $name:ident / $avx2:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)
    ) => {
        $(#[$doc])*
        fn $name(&self, $($arg: $ty),*) -> candle_core::Result<()> {
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { self.$avx2($($arg),*) };
            }
            self.$body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2(&self, $($arg: $ty),*) -> candle_core::Result<()> {
            self.$body($($arg),*)
        }
    };
}

/// The inputs of one call, contiguous.
struct Inputs<'a, T> {
    dims: Dims,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    keys: &'a Keys<T>,
    scale: T,
}

impl<'a, T: Float> Inputs<'a, T> {
    /// Query rows `rows` of (b, h): [rows, D].
    fn q_rows(&self, b: usize, h: usize, rows: &Range<usize>) -> &'a [T] {
        let Dims { h: nh, t, d, .. } = self.dims;
        let at = (b * nh + h) * t;
        &self.q[(at + rows.start) * d..(at + rows.end) * d]
    }

    /// Keys and values of the key-value head query head h of batch row b reads: each [Tk, D].
    fn kv_head(&self, b: usize, h: usize) -> (&'a [T], &'a [T]) {
        let Dims { kv, tk, d, .. } = self.dims;
        let at = (b * kv + h / self.dims.group()) * tk * d;
        (&self.k[at..at + tk * d], &self.v[at..at + tk * d])
    }

    avx2_dispatch! {
        /// Output rows `rows` of (b, h) into `o` [rows, D], and into `stats` each row's max score
        /// and the inverse of its sum of exp(score - max): P_ij = exp(S_ij - max_i) inv_sum_i.
        fn forward_tile / forward_tile_avx2 => forward_tile_body(
            b: usize,
            h: usize,
            rows: Range<usize>,
            o: &mut [T],
            stats: &mut [[T; 2]],
        )
    }

    #[inline(always)]
    fn forward_tile_body(
        &self,
        b: usize,
        h: usize,
        rows: Range<usize>,
        o: &mut [T],
        stats: &mut [[T; 2]],
    ) -> candle_core::Result<()> {
        let d = self.dims.d;
        let n = rows.len();
        let q = Mat::row_major(self.q_rows(b, h, &rows), n, d);
        let (k, v) = self.kv_head(b, h);
        let end = self.keys.end(&self.dims, b, &rows);
        // Per row: the running max of the scores and the sum of exp(score - max).
        let mut max = [T::NEG_INFINITY; QUERY_TILE];
        let mut sum = [T::zero(); QUERY_TILE];
        // The tile's scores, then its weights: [n, keys of the tile].
        let mut s = [T::zero(); QUERY_TILE * KEY_TILE];
        o.fill(T::zero());
        for j0 in (0..end).step_by(KEY_TILE) {
            let c = KEY_TILE.min(end - j0);
            let s = &mut s[..n * c];
            let (k, v) = (key_rows(k, j0, c, d), key_rows(v, j0, c, d));
            // S = Q K^T
            matmul_here(s, q, k.t(), false)?;
            for (r, i) in rows.clone().enumerate() {
                let s = &mut s[r * c..(r + 1) * c];
                self.keys
                    .scale_and_mask(&self.dims, b, i, j0, self.scale, s);
                let m = s.iter().fold(max[r], |m, &x| if x > m { x } else { m });
                if m == T::NEG_INFINITY {
                    s.fill(T::zero()); // every key so far masked
                    continue;
                }
                let rescale = (max[r] - m).softmax_exp();
                if rescale != T::one() {
                    o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= rescale);
                    sum[r] *= rescale;
                }
                max[r] = m;
                s.iter_mut().for_each(|x| *x = (*x - m).softmax_exp());
                sum[r] = s.iter().fold(sum[r], |acc, &x| acc + x);
            }
            // O += P V
            matmul_here(o, Mat::row_major(s, n, c), v, true)?;
        }
        for (r, stats) in stats.iter_mut().enumerate() {
            let inv = T::one() / sum[r];
            o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
            *stats = [max[r], inv];
        }
        Ok(())
    }

    /// The forward of every row: (O [B, H, T, D], softmax statistics [B, H, T]).
    fn forward(&self) -> candle_core::Result<(Vec<T>, Vec<[T; 2]>)> {
        let Dims { b, h, t, d, .. } = self.dims;
        let mut o = vec![T::zero(); b * h * t * d];
        let mut stats = vec![[T::zero(); 2]; b * h * t];
        if t == 0 {
            return Ok((o, stats));
        }
        o.par_chunks_mut(t * d)
            .zip(stats.par_chunks_mut(t))
            .enumerate()
            .try_for_each(|(bh, (o, stats))| {
                o.par_chunks_mut(QUERY_TILE * d)
                    .zip(stats.par_chunks_mut(QUERY_TILE))
                    .enumerate()
                    .try_for_each(|(tile, (o, stats))| {
                        let start = tile * QUERY_TILE;
                        let rows = start..start + stats.len();
                        self.forward_tile(bh / h, bh % h, rows, o, stats)
                    })
            })?;
        Ok((o, stats))
    }

    avx2_dispatch! {
        /// One backward task: query tiles `tiles` of (b, h), adding into dq [T, D] of (b, h) and
        /// into dk, dv [Tk, D] of this task. `o`, `dout` [T, D] and `stats` [T] are (b, h)'s.
        fn backward_task / backward_task_avx2 => backward_task_body(
            bh: (usize, usize),
            tiles: impl Iterator<Item = Range<usize>>,
            head: (&[T], &[T], &[[T; 2]]),
            grads: (&mut [T], &mut [T], &mut [T]),
        )
    }

    #[inline(always)]
    fn backward_task_body(
        &self,
        (b, h): (usize, usize),
        tiles: impl Iterator<Item = Range<usize>>,
        (o, dout, stats): (&[T], &[T], &[[T; 2]]),
        (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
    ) -> candle_core::Result<()> {
        let d = self.dims.d;
        let (k, v) = self.kv_head(b, h);
        let mut p = [T::zero(); QUERY_TILE * KEY_TILE];
        let mut dp = [T::zero(); QUERY_TILE * KEY_TILE];
        for rows in tiles {
            let n = rows.len();
            let q = Mat::row_major(self.q_rows(b, h, &rows), n, d);
            let dout_rows = Mat::row_major(&dout[rows.start * d..rows.end * d], n, d);
            let dq = &mut dq[rows.start * d..rows.end * d];
            let end = self.keys.end(&self.dims, b, &rows);
            // D_i = dO_i . O_i (FlashAttention-2's rowsum(dO * O)).
            let delta: Vec<T> = rows
                .clone()
                .map(|i| dot(&dout[i * d..(i + 1) * d], &o[i * d..(i + 1) * d]))
                .collect();
            for j0 in (0..end).step_by(KEY_TILE) {
                let c = KEY_TILE.min(end - j0);
                let (p, dp) = (&mut p[..n * c], &mut dp[..n * c]);
                let keys = j0 * d..(j0 + c) * d;
                let (k_rows, v_rows) = (key_rows(k, j0, c, d), key_rows(v, j0, c, d));
                // The forward's softmax, recomputed: P = exp(S - max) / sum.
                matmul_here(p, q, k_rows.t(), false)?;
                for (r, i) in rows.clone().enumerate() {
                    let p = &mut p[r * c..(r + 1) * c];
                    self.keys
                        .scale_and_mask(&self.dims, b, i, j0, self.scale, p);
                    let [max, inv_sum] = stats[i];
                    p.iter_mut()
                        .for_each(|x| *x = (*x - max).softmax_exp() * inv_sum);
                }
                // dV += P^T dO; dP = dO V^T
                matmul_here(
                    &mut dv[keys.clone()],
                    Mat::row_major(p, n, c).t(),
                    dout_rows,
                    true,
                )?;
                matmul_here(dp, dout_rows, v_rows.t(), false)?;
                // dS = P (dP - D), through the scale: dQ += dS K, dK += dS^T Q.
                for (r, (ds, p)) in dp.chunks_mut(c).zip(p.chunks(c)).enumerate() {
                    for (ds, &p) in ds.iter_mut().zip(p) {
                        *ds = p * (*ds - delta[r]) * self.scale;
                    }
                }
                let ds = Mat::row_major(dp, n, c);
                matmul_here(dq, ds, k_rows, true)?;
                matmul_here(&mut dk[keys], ds.t(), q, true)?;
            }
        }
        Ok(())
    }

    /// dQ [B, H, T, D], dK and dV [B, KV, Tk, D] from O and dO [B, H, T, D] and the forward's
    /// softmax statistics [B, H, T].
    fn backward(&self, o: &[T], dout: &[T], stats: &[[T; 2]]) -> candle_core::Result<Grads<T>> {
        let Dims { b, h, kv, t, tk, d } = self.dims;
        if t == 0 {
            return Ok((
                Vec::new(),
                vec![T::zero(); b * kv * tk * d],
                vec![T::zero(); b * kv * tk * d],
            ));
        }
        let n_tiles = t.div_ceil(QUERY_TILE);
        // Enough tasks for every thread even at batch 1: each (b, h) split into `shares`, query
        // tiles dealt out in turn so that early (short, causal) and late tiles mix.
        let shares = (2 * rayon::current_num_threads())
            .div_ceil(b * h)
            .clamp(1, n_tiles);
        let tasks: Vec<Grads<T>> = (0..b * h * shares)
            .into_par_iter()
            .map(|task| {
                let (bh, share) = (task / shares, task % shares);
                let (bi, hi) = (bh / h, bh % h);
                let mut dq = vec![T::zero(); t * d];
                let mut dk = vec![T::zero(); tk * d];
                let mut dv = vec![T::zero(); tk * d];
                let tiles = (share..n_tiles)
                    .step_by(shares)
                    .map(|tile| tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(t));
                let rows = bh * t * d..(bh + 1) * t * d;
                let head = (&o[rows.clone()], &dout[rows], &stats[bh * t..(bh + 1) * t]);
                self.backward_task((bi, hi), tiles, head, (&mut dq, &mut dk, &mut dv))?;
                Ok((dq, dk, dv))
            })
            .collect::<candle_core::Result<_>>()?;
        // dQ of (b, h): the sum of its shares.
        let mut dq = vec![T::zero(); b * h * t * d];
        dq.par_chunks_mut(t * d).enumerate().for_each(|(bh, dq)| {
            for (part, _, _) in &tasks[bh * shares..(bh + 1) * shares] {
                axpy(T::one(), part, dq);
            }
        });
        // dK, dV of (b, g): the sum over the query heads of group g and their shares.
        let group = h / kv;
        let mut dk = vec![T::zero(); b * kv * tk * d];
        let mut dv = vec![T::zero(); b * kv * tk * d];
        dk.par_chunks_mut(tk * d)
            .zip(dv.par_chunks_mut(tk * d))
            .enumerate()
            .for_each(|(bg, (dk, dv))| {
                let (bi, g) = (bg / kv, bg % kv);
                let first = (bi * h + g * group) * shares;
                for (_, pk, pv) in &tasks[first..first + group * shares] {
                    axpy(T::one(), pk, dk);
                    axpy(T::one(), pv, dv);
                }
            });
        Ok((dq, dk, dv))
    }
}

/// dQ, dK and dV.
type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// Rows j0..j0 + c of a head's keys or values [Tk, D], as a matrix.
#[inline(always)]
fn key_rows<T>(x: &[T], j0: usize, c: usize, d: usize) -> Mat<'_, T> {
    Mat::row_major(&x[j0 * d..(j0 + c) * d], c, d)
}

/// A contiguous input's elements.
fn contiguous<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused attention wants contiguous inputs".into()))?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// A tensor's elements in order, as T.
fn elements<T: Float>(x: &Tensor) -> candle_core::Result<Vec<T>> {
    x.detach().flatten_all()?.to_vec1()
}

impl FlashAttention {
    fn forward<T: Float>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::of(l1.dims(), l2.dims(), l3.dims())?;
        let keys = Keys::new(&self.mask, &dims)?;
        let inputs = Inputs {
            dims,
            q: contiguous(s1, l1)?,
            k: contiguous(s2, l2)?,
            v: contiguous(s3, l3)?,
            keys: &keys,
            scale: T::from_f64(1.0 / (dims.d as f64).sqrt()),
        };
        let (o, stats) = inputs.forward()?;
        *self.stats.lock().map_err(|_| poisoned())? =
            Some(stats.iter().map(|s| s.map(|x| x.to_f64())).collect());
        Ok((T::to_cpu_storage_owned(o), l1.shape().clone()))
    }

    fn backward<T: Float>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let dims = Dims::of(q.dims(), k.dims(), v.dims())?;
        let keys = Keys::new(&self.mask, &dims)?;
        let stats: Vec<[T; 2]> = match self.stats.lock().map_err(|_| poisoned())?.as_ref() {
            Some(stats) => stats.iter().map(|s| s.map(T::from_f64)).collect(),
            None => {
                return Err(candle_core::Error::Msg(
                    "fused attention: backward before its forward".into(),
                ))
            }
        };
        let (qs, ks, vs) = (elements(q)?, elements(k)?, elements(v)?);
        let inputs = Inputs {
            dims,
            q: &qs,
            k: &ks,
            v: &vs,
            keys: &keys,
            scale: T::from_f64(1.0 / (dims.d as f64).sqrt()),
        };
        let (dq, dk, dv) = inputs.backward(&elements(o)?, &elements(dout)?, &stats)?;
        let device = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), device)?,
            Tensor::from_vec(dk, k.shape(), device)?,
            Tensor::from_vec(dv, v.shape(), device)?,
        ))
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused attention: a thread panicked holding its state".into())
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        match s1.dtype() {
            DType::F32 => self.forward::<f32>(args.0, args.1, args.2),
            DType::F64 => self.forward::<f64>(args.0, args.1, args.2),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other,
                "fused-attention",
            )),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward::<f32>((q, k, v), o, dout)?,
            DType::F64 => self.backward::<f64>((q, k, v), o, dout)?,
            other => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    other,
                    "fused-attention",
                ))
            }
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
