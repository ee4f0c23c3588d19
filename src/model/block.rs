//! One transformer block of the source family, written as plain differentiable ops:
//! Llama `x += attn(norm1(x)); x += mlp(norm2(x))`; OLMo-2 `x += norm1(attn(x)); x += norm2(mlp(x))`
//! with RMSNorm over the full projected q and k before RoPE; Qwen2 Llama's with q/k/v biases;
//! Qwen3 Llama's with RMSNorm over each head of q and k before RoPE. Grouped-query attention,
//! SwiGLU MLP.
//! RMSNorm, RoPE and SwiGLU run as the fused ops of `fused/` where `ctx.kernels` allows (CPU,
//! f32/f64); the composed ops here are their reference and the path everywhere else.

use candle_core::{Tensor, D};

use crate::formats::hf_config::ModelConfig;

use super::fused::{self, attention, Kernels};
use super::{rope, Result, Weight};

/// Where a block's norms sit.
pub enum Norms {
    /// Llama: before attention and before the MLP.
    Pre { attn: Tensor, mlp: Tensor },
    /// Qwen3: Llama's, plus RMSNorm over each head of q and k (weights [head_dim]).
    PreHeads {
        attn: Tensor,
        mlp: Tensor,
        q: Tensor,
        k: Tensor,
    },
    /// OLMo-2: on the attention and MLP outputs, plus q/k norms.
    Post {
        attn: Tensor,
        mlp: Tensor,
        q: Tensor,
        k: Tensor,
    },
}

pub(crate) struct Block {
    pub norms: Norms,
    /// [q + 2 kv, h]: rows of q, then k, then v.
    pub wqkv: Weight,
    /// Qwen2: [q + 2 kv], added after `wqkv` (kept apart: `wqkv` may be quantized or low-rank).
    pub qkv_bias: Option<Tensor>,
    /// [h, q]
    pub wo: Weight,
    /// [2 f, h]: rows of gate, then up.
    pub w_gate_up: Weight,
    /// [h, f]
    pub w_down: Weight,
}

/// What every block of one forward pass shares.
pub struct Context<'a> {
    /// [B, 1, T, past + T], 0 or -1e9: only where the composed attention serves the pass.
    pub bias: Option<&'a Tensor>,
    /// The same mask in the fused attention's compact form.
    pub mask: &'a attention::Mask,
    /// [B, 1, T, head_dim]
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub config: &'a ModelConfig,
    pub kernels: Kernels,
}

/// RMSNorm through the kernels `kernels` chooses for `x`: the fused op, or [`rms_norm`].
pub fn norm(x: &Tensor, w: &Tensor, eps: f64, kernels: Kernels) -> candle_core::Result<Tensor> {
    if kernels.fused_for(x) {
        fused::norm::rms_norm(x, w, eps)
    } else {
        rms_norm(x, w, eps)
    }
}

/// x / sqrt(mean(x^2) + eps) * w over the last axis.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + eps)?.sqrt()?)?
        .broadcast_mul(w)
}

/// softmax over the last axis from exp and sum (candle's fused version records no gradient).
pub(crate) fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// x @ w^T for x (..., in) and w (out, in): (..., in) -> (..., out). Flattened to one 2-D matmul,
/// because broadcasting w over the batch makes its gradient a batch of full-size copies. A frozen
/// w under a tracked x (on the CPU) goes through [`fused::linear::frozen_linear`], whose backward
/// forms no dW.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let frozen = x.track_op() && !w.track_op() && Kernels::Fused.fused_for(x);
    on_rows(x, w.dim(0)?, |rows| {
        if frozen && w.dtype() == x.dtype() {
            fused::linear::frozen_linear(rows, w)
        } else {
            rows.matmul(&w.t()?)
        }
    })
}

/// `f` applied to `x` (..., in) flattened to rows (n, in), giving (n, out): (..., out).
pub(crate) fn on_rows(
    x: &Tensor,
    out: usize,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (lead, inner) = dims.split_at(dims.len() - 1);
    let rows: usize = lead.iter().product();
    let y = f(&x.reshape((rows, inner[0]))?)?;
    let mut shape = lead.to_vec();
    shape.push(out);
    y.reshape(shape)
}

/// silu(gate) * up of a fused (..., 2f) [gate | up] projection: (..., 2f) -> (..., f).
pub fn swiglu(gu: &Tensor) -> candle_core::Result<Tensor> {
    let f = gu.dim(D::Minus1)? / 2;
    let gate = gu.narrow(D::Minus1, 0, f)?;
    let up = gu.narrow(D::Minus1, f, f)?;
    silu(&gate)? * up
}

/// x * sigmoid(x), from exp.
fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x / (x.neg()?.exp()? + 1.0)?
}

impl Block {
    /// (B, T, h) -> (B, T, h). `cache`: this block run's KV slot, extended in place.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let norm = |x: &Tensor, w: &Tensor| norm(x, w, ctx.config.norm_eps, ctx.kernels);
        Ok(match &self.norms {
            Norms::Pre { attn, mlp } | Norms::PreHeads { attn, mlp, .. } => {
                let x = (x + self.attention(&norm(x, attn)?, ctx, cache)?)?;
                (&x + self.mlp(&norm(&x, mlp)?, ctx)?)?
            }
            Norms::Post { attn, mlp, .. } => {
                let x = (x + norm(&self.attention(x, ctx, cache)?, attn)?)?;
                (&x + norm(&self.mlp(&x, ctx)?, mlp)?)?
            }
        })
    }

    fn attention(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let c = ctx.config;
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        // (B, T, h) @ (h, q + 2kv) -> (B, T, q + 2kv)
        let mut qkv = self.wqkv.forward(x)?;
        if let Some(bias) = &self.qkv_bias {
            qkv = qkv.broadcast_add(bias)?;
        }
        let mut q = qkv.narrow(D::Minus1, 0, nh * hd)?;
        let mut k = qkv.narrow(D::Minus1, nh * hd, nkv * hd)?;
        let v = qkv.narrow(D::Minus1, (nh + nkv) * hd, nkv * hd)?;
        match &self.norms {
            Norms::Post { q: qn, k: kn, .. } => {
                q = norm(&q, qn, c.norm_eps, ctx.kernels)?;
                k = norm(&k, kn, c.norm_eps, ctx.kernels)?;
            }
            Norms::PreHeads { q: qn, k: kn, .. } => {
                // (B, T, n D) -> (B, T, n, D), normed over D, and back.
                let per_head = |x: &Tensor, n: usize, w: &Tensor| -> candle_core::Result<Tensor> {
                    norm(&x.reshape((b, t, n, hd))?, w, c.norm_eps, ctx.kernels)?.reshape((
                        b,
                        t,
                        n * hd,
                    ))
                };
                q = per_head(&q, nh, qn)?;
                k = per_head(&k, nkv, kn)?;
            }
            Norms::Pre { .. } => {}
        }
        // (B, T, heads * D) -> (B, heads, T, D)
        let heads = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        // (B, T, heads * D) -> (B, heads, T, D), rotated: fused, the split into heads included.
        let rotated = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            if ctx.kernels.fused_for(&x) {
                fused::rope::rope_heads(&x, n, ctx.cos, ctx.sin)
            } else {
                rope::apply(&heads(x, n)?, ctx.cos, ctx.sin)
            }
        };
        let q = rotated(q, nh)?;
        let mut k = rotated(k, nkv)?;
        let mut v = heads(v, nkv)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // (B, H, T, D) with k, v (B, KV, past + T, D) -> (B, H, T, D)
        // The frame built a bias exactly where the fused attention does not serve.
        let out = match ctx.bias {
            None => attention::fused(&q, &k, &v, ctx.mask)?,
            Some(bias) => attention::composed(&q, &k, &v, bias)?,
        };
        // (B, H, T, D) -> (B, T, H * D)
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        // (B, T, q) @ (q, h) -> (B, T, h)
        Ok(self.wo.forward(&out)?)
    }

    /// down(silu(gate(x)) * up(x)): (B, T, h) -> (B, T, h)
    fn mlp(&self, x: &Tensor, ctx: &Context) -> Result<Tensor> {
        // (B, T, h) @ (h, 2f) -> (B, T, 2f)
        let gu = self.w_gate_up.forward(x)?;
        // (B, T, 2f) -> (B, T, f)
        let hidden = if ctx.kernels.fused_for(&gu) {
            fused::swiglu::swiglu(&gu)?
        } else {
            swiglu(&gu)?
        };
        Ok(self.w_down.forward(&hidden)?)
    }
}
