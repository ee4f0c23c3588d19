//! Fused CPU ops with hand-written backward passes (DESIGN decision 12): the hot paths of the
//! forward pass (RMSNorm, RoPE, attention, SwiGLU, lm_head with cross-entropy) as candle custom
//! ops, multi-threaded over rows, f32 (and f64, for finite-difference checks) with f32 or wider
//! accumulation. The composed differentiable ops in `block.rs` and `rope.rs` stay as the
//! reference: every fused op is proved equal to them, and they remain the path on other devices.

pub mod attention;

/// Which implementation of the hot ops a pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused ops where they apply (CPU, f32 or f64); the composed ops elsewhere.
    #[default]
    Fused,
    /// The composed differentiable candle ops: the reference the fused ones are proved against.
    Composed,
}
