//! Perplexity of a model over token windows at a test-time recurrence r.

use std::time::Instant;

use candle_core::Tensor;

use crate::model::{InitialState, Model, Result};
use crate::progress::Progress;

use super::data::Windows;

/// Loss and perplexity at one recurrence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRow {
    /// None for a static model (no recurrence).
    pub r: Option<usize>,
    /// Mean next-token cross-entropy, nats.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

/// Scores every window at recurrence `r`, `batch` windows at a time (right-padded, masked); a
/// window's context inputs ([`super::data::Window::context`]) are run but not scored. The
/// initial state of batch i is drawn with seed `seed + i`, so a run is reproducible.
pub fn perplexity(
    model: &Model,
    windows: &Windows,
    batch: usize,
    r: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalRow> {
    let started = Instant::now();
    let (mut nll, mut count, mut done) = (0.0f64, 0.0f64, 0usize);
    for (i, group) in windows.batches(batch).enumerate() {
        let t = group.iter().map(|w| w.inputs.len()).max().unwrap_or(0);
        let b = group.len();
        let (mut ids, mut targets, mut mask, mut weights) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
        );
        for w in group {
            // Row: context (not scored), scored targets, right padding.
            let (context, pad) = (w.context(), t - w.inputs.len());
            ids.extend(w.inputs.iter().copied().chain(std::iter::repeat_n(0, pad)));
            targets.extend(
                std::iter::repeat_n(0, context)
                    .chain(w.targets.iter().copied())
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(
                std::iter::repeat_n(1u32, w.inputs.len()).chain(std::iter::repeat_n(0, pad)),
            );
            weights.extend(
                std::iter::repeat_n(0f32, context)
                    .chain(std::iter::repeat_n(1.0, w.targets.len()))
                    .chain(std::iter::repeat_n(0.0, pad)),
            );
        }
        let device = model.device();
        let ids = Tensor::from_vec(ids, (b, t), device)?;
        let mask_t = Tensor::from_vec(mask, (b, t), device)?;
        let padded = group.iter().any(|w| w.inputs.len() < t);
        let targets = Tensor::from_vec(targets, (b, t), device)?;
        let weights = Tensor::from_vec(weights, (b, t), device)?;
        let (sum, n) = model.nll_sum(
            &ids,
            padded.then_some(&mask_t),
            &targets,
            &weights,
            r,
            InitialState::Seeded(seed.wrapping_add(i as u64)),
        )?;
        nll += sum;
        count += n;
        done += n as usize;
        progress(done);
    }
    let seconds = started.elapsed().as_secs_f64();
    let loss = if count > 0.0 { nll / count } else { f64::NAN };
    Ok(EvalRow {
        r: model.is_recurrent().then_some(r),
        loss,
        perplexity: loss.exp(),
        tokens: done,
        seconds,
        tokens_per_second: done as f64 / seconds.max(1e-9),
    })
}

/// An evaluation that failed, with the recurrence it ran at.
#[derive(Debug, thiserror::Error)]
#[error("evaluating at r = {r}: {source}")]
pub struct EvalError {
    pub r: usize,
    pub source: crate::model::ModelError,
}

/// [`perplexity`] at each r in turn, each reported to `progress` as "{label}r=R" in scored tokens.
pub fn rows(
    model: &Model,
    windows: &Windows,
    rs: &[usize],
    batch: usize,
    seed: u64,
    label: &str,
    progress: &mut dyn Progress,
) -> std::result::Result<Vec<EvalRow>, EvalError> {
    let mut rows = Vec::with_capacity(rs.len());
    for &r in rs {
        progress.start(&format!("{label}r={r}"), windows.n_targets() as u64);
        let row = perplexity(model, windows, batch, r, seed, &mut |done| {
            progress.advance(done as u64)
        })
        .map_err(|source| EvalError { r, source })?;
        progress.finish();
        rows.push(row);
    }
    Ok(rows)
}
