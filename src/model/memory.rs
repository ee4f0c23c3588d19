//! The memory one forward pass needs, checked before it runs: a window too long for the machine
//! is refused with a message instead of aborting the process in the allocator (issue 18: `eval
//! --seq-len 100000` asked for 10.9 GB and died).
//!
//! The estimate is a lower bound of what the pass allocates at its peak, so a refusal is never
//! wrong; a pass that fits the bound may still need somewhat more. It depends on the kernels: the
//! composed ops hold attention scores of B x heads x T^2 and full logits, the fused ones neither.

use candle_core::{DType, Device};

use crate::formats::hf_config::ModelConfig;

use super::fused::xent::block_rows;
use super::{Kernels, ModelError, Result};

/// Bytes of an f32.
const F32: u128 = 4;

/// A lower bound of the bytes one forward pass over `b` sequences of `t` tokens allocates at its
/// peak, in f32. Composed: the attention scores and their softmax, (B, heads, T, T) twice plus
/// the (B, 1, T, T) mask, and the logits with the shifted copy and exponentials the loss makes,
/// (B, T, V) three times. Fused: one block's gate and up projections and its output, (B, T, 2 FFN
/// + h), and one block of lm_head's logits (`fused::xent`).
pub(crate) fn pass_bytes(c: &ModelConfig, b: usize, t: usize, fused: bool) -> u128 {
    let (b, t) = (b as u128, t as u128);
    let vocab = c.vocab as u128;
    if fused {
        let rows = b * t;
        let activations = rows * (2 * c.ffn as u128 + c.hidden as u128);
        let logits = block_rows(rows.min(usize::MAX as u128) as usize, c.vocab) as u128 * vocab;
        return (activations + logits) * F32;
    }
    let scores = b * c.n_heads as u128 * t * t * 2 + b * t * t;
    let logits = b * t * vocab * 3;
    (scores + logits) * F32
}

/// The memory the system can still give (Linux's MemAvailable); None where it is not known.
pub(crate) fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Refuses a pass over `b` sequences of `t` tokens on the CPU, through `kernels`, whose lower
/// bound is more than the memory available (a CUDA device reports its own out-of-memory error,
/// which candle returns).
pub fn check_pass(
    c: &ModelConfig,
    b: usize,
    t: usize,
    kernels: Kernels,
    device: &Device,
) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    let Some(available) = available_bytes() else {
        return Ok(());
    };
    let need = pass_bytes(c, b, t, kernels.fused_on(device, DType::F32));
    if need > u128::from(available) {
        return Err(ModelError::Invalid(format!(
            "a forward pass over {b} sequence(s) of {t} tokens needs at least {}, more than the \
             {} of memory available; lower --seq-len or the batch",
            gb(need),
            gb(u128::from(available))
        )));
    }
    Ok(())
}

fn gb(bytes: u128) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_counts_scores_and_logits_or_the_fused_blocks() {
        let c = crate::formats::hf_config::parse(
            br#"{"model_type":"llama","hidden_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":320,"vocab_size":4096}"#,
        )
        .unwrap();
        // scores 1 x 4 x 10 x 10 x 2 + mask 1 x 10 x 10, logits 1 x 10 x 4096 x 3, in f32.
        assert_eq!(pass_bytes(&c, 1, 10, false), (800 + 100 + 122_880) * 4);
        // Fused: 10 rows of 2 x 320 + 128, and 10 rows of logits (a block is up to 2048 rows).
        assert_eq!(pass_bytes(&c, 1, 10, true), (10 * 768 + 10 * 4096) * 4);
        // 4 windows of 100,000 tokens: about 1.3 TB of attention scores alone, composed; fused,
        // 307 MB of activations and one 32 MB block of logits.
        assert!(pass_bytes(&c, 4, 100_000, false) > 1_000_000_000_000);
        assert_eq!(
            pass_bytes(&c, 4, 100_000, true),
            (400_000 * 768 + 2048 * 4096) * 4
        );
        let err = check_pass(&c, 4, 100_000, Kernels::Composed, &Device::Cpu).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("a forward pass over 4 sequence(s) of 100000 tokens needs at least"),
            "{err}"
        );
        assert!(check_pass(&c, 1, 10, Kernels::Composed, &Device::Cpu).is_ok());
        assert!(check_pass(&c, 4, 100_000, Kernels::Fused, &Device::Cpu).is_ok());
    }
}
