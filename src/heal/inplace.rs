//! The optimizers' elementwise arithmetic as in-place, multi-threaded candle ops on CPU f32
//! tensors (DESIGN decision 12): each update reads and writes its tensors once, on every core,
//! where the composed tensor ops of `optim.rs` allocate a new full-size tensor per op on one
//! thread (an AdamW step of SmolLM2's 135 M parameters made a dozen 540 MB temporaries).
//!
//! Every kernel performs exactly the f32 operations of the composed path, in the same order
//! (candle's `affine(mul, add)` is `x * mul + add` in f32), so the two paths give the same bits;
//! `optim.rs` uses these when every tensor involved is a contiguous f32 tensor on the CPU and the
//! composed ops otherwise (other devices and dtypes).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortize scheduling, small enough to balance.
const CHUNK: usize = 1 << 15;

/// True when `t` is a contiguous f32 tensor on the CPU: what these kernels update or read.
pub(crate) fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{name}: needs a contiguous f32 tensor"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, name: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{name}: needs a contiguous f32 tensor"),
    }
}

fn same_len(name: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        candle_core::bail!("{name}: {a} elements against {b}");
    }
    Ok(())
}

/// `dst = (dst * keep + 0) + (f(src) * take + 0)` with f the identity or the square: the moment
/// updates `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2` and Muon's momentum buffer.
pub(crate) struct Blend {
    pub keep: f32,
    pub take: f32,
    pub square: bool,
}

impl InplaceOp2 for Blend {
    fn name(&self) -> &'static str {
        "blend"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dst = slice_mut(s1, l1, self.name())?;
        let src = slice(s2, l2, self.name())?;
        same_len(self.name(), dst.len(), src.len())?;
        let (keep, take, square) = (self.keep, self.take, self.square);
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| {
                for (d, &g) in d.iter_mut().zip(s) {
                    let g = if square { g * g } else { g };
                    *d = (*d * keep + 0.0) + (g * take + 0.0);
                }
            });
        Ok(())
    }
}

/// The decoupled-weight-decay step `w = (w - (w * lr_wd + 0)) - (u * lr + 0)` with the update u
/// read from a tensor (Muon's orthogonalized momentum).
pub(crate) struct DecayedStep {
    pub lr: f32,
    pub lr_wd: f32,
}

impl DecayedStep {
    #[inline(always)]
    fn apply(&self, w: f32, update: f32) -> f32 {
        (w - (w * self.lr_wd + 0.0)) - (update * self.lr + 0.0)
    }
}

impl InplaceOp2 for DecayedStep {
    fn name(&self) -> &'static str {
        "decayed-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let w = slice_mut(s1, l1, self.name())?;
        let u = slice(s2, l2, self.name())?;
        same_len(self.name(), w.len(), u.len())?;
        w.par_chunks_mut(CHUNK)
            .zip(u.par_chunks(CHUNK))
            .for_each(|(w, u)| {
                for (w, &u) in w.iter_mut().zip(u) {
                    *w = self.apply(*w, u);
                }
            });
        Ok(())
    }
}

/// AdamW's weight step from updated moments m and v:
/// `u = (m / (sqrt(v) * inv_bias2_sqrt + eps)) * inv_bias1 + 0`, then [`DecayedStep`].
pub(crate) struct AdamWStep {
    pub inv_bias1: f32,
    pub inv_bias2_sqrt: f32,
    pub eps: f32,
    pub step: DecayedStep,
}

impl InplaceOp3 for AdamWStep {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let w = slice_mut(s1, l1, self.name())?;
        let m = slice(s2, l2, self.name())?;
        let v = slice(s3, l3, self.name())?;
        same_len(self.name(), w.len(), m.len())?;
        same_len(self.name(), w.len(), v.len())?;
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() * self.inv_bias2_sqrt + self.eps;
                    let update = (m / denom) * self.inv_bias1 + 0.0;
                    *w = self.step.apply(*w, update);
                }
            });
        Ok(())
    }
}

/// Sum of squares of a tensor's elements in f64, on every core (gradient clipping's norm). The
/// chunks' sums are added in order, so the result does not depend on the thread count or on
/// scheduling (a resumed run must clip exactly as the uninterrupted one). `None` when `t` is not a
/// contiguous f32 CPU tensor.
pub(crate) fn sum_of_squares(t: &Tensor) -> Option<f64> {
    if !applies(t) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let values = slice(cpu, layout, "sum-of-squares").ok()?;
    let partial: Vec<f64> = values
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .collect();
    Some(partial.iter().sum())
}
