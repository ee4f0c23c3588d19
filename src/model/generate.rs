//! Generation: incremental decoding with a KV cache per (recurrence, layer), sampling
//! (greedy, temperature, top-p), and adaptive compute per token (`--exit latent-diff:EPS`).
//!
//! Adaptive exit follows Huginn (Geiping et al., 2025, section 6, "zero-shot adaptive
//! compute"): while decoding a token, the core stops iterating once the relative change of the
//! state, ||s_i - s_{i-1}|| / ||s_i||, falls below EPS (compared from i = 2 on, as s_0 is noise
//! rather than a computed state; at most r iterations). The cache
//! still holds r core slots per layer, and later tokens attend at every recurrence k < r, so a
//! token that stopped after i < r iterations must leave keys and values in the slots of the
//! iterations it skipped. We store there the keys and values of its last computed iteration
//! (i - 1), for every skipped k: Huginn's "latest" cache lookup does the same. Every slot thus
//! holds one entry per token, and with a state that has converged (s_i = s_{i-1}) the stored
//! entries are exactly those a full run would have computed.

use candle_core::{IndexOp, Tensor};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{block, InitialState, KvCache, Model, ModelError, Result};

/// `--exit`: when a token's core iterations stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Exit {
    /// Always r iterations.
    Never,
    /// Stop once ||s_i - s_{i-1}|| / ||s_i|| < EPS.
    LatentDiff(f64),
}

impl std::str::FromStr for Exit {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Exit, String> {
        let eps = s
            .strip_prefix("latent-diff:")
            .ok_or_else(|| format!("unknown --exit {s:?} (expected latent-diff:EPS)"))?;
        match eps.parse::<f64>() {
            Ok(e) if e.is_finite() && e >= 0.0 => Ok(Exit::LatentDiff(e)),
            _ => Err(format!(
                "--exit latent-diff:{eps}: EPS must be a number >= 0"
            )),
        }
    }
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Core iterations per token (the most, with an early exit).
    pub r: usize,
    pub max_tokens: usize,
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this.
    pub top_p: f64,
    /// Seeds the sampler and the initial states.
    pub seed: u64,
    pub exit: Exit,
    /// Generation ends after any of these tokens (it is returned, not printed by callers).
    pub stop: Vec<u32>,
}

/// What one generation did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateReport {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    /// Core iterations of each generated token fed back (empty for a static model). The first
    /// token comes from the prompt's pass, which always runs the full r.
    pub recurrences: Vec<usize>,
    /// Mean of `recurrences`; None for a static model.
    pub mean_recurrence: Option<f64>,
    /// `stop_token` or `max_tokens`.
    pub stopped: &'static str,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Tokens fed back per second of decoding: one forward pass per token, prefill excluded.
    pub tokens_per_second: f64,
}

impl KvCache {
    /// Entries (tokens) per slot in use, in slot order: all equal in a consistent cache.
    pub fn slot_lens(&self) -> Vec<usize> {
        self.slots
            .iter()
            .flatten()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .collect()
    }

    /// The keys and values of slot `i` ([B, kv_heads, tokens, head_dim] each), if filled.
    pub fn slot(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.slots.get(i)?.as_ref()
    }
}

impl Model {
    /// Continues `cache` with `ids` [1, T] at recurrence at most `r`, stopping the core early per
    /// `exit` (measured over the whole chunk); returns the last position's logits [V] and the
    /// number of core iterations run. Skipped iterations' slots get the last computed
    /// iteration's keys and values (module docs), so the cache always serves r recurrences.
    pub fn forward_step(
        &self,
        ids: &Tensor,
        r: usize,
        exit: Exit,
        state: InitialState,
        cache: &mut KvCache,
    ) -> Result<(Vec<f32>, usize)> {
        let run = super::Run {
            r,
            without_grad: 0,
            exit,
        };
        let (x, iterations) = self.hidden(ids, None, run, state, Some(cache))?;
        let t = x.dim(1)?;
        // Only the last position is needed: (B, 1, h) -> (B, 1, V)
        let last = x.narrow(1, t - 1, 1)?;
        let last = block::rms_norm(&last, &self.final_norm, self.config.norm_eps)?;
        let logits = self.lm_head.forward(&last)?;
        let logits = logits.i((0, 0))?.to_dtype(candle_core::DType::F32)?;
        Ok((logits.to_vec1::<f32>()?, iterations))
    }
}

/// ||s - previous|| / ||s|| over all elements.
pub(super) fn relative_change(s: &Tensor, previous: &Tensor) -> Result<f64> {
    let diff = (s - previous)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let norm = s.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((f64::from(diff) / f64::from(norm).max(f64::MIN_POSITIVE)).sqrt())
}

/// After a token ran `done` < `r` core iterations, appends its keys and values of the last
/// computed iteration to the slots of the iterations it skipped.
pub(super) fn fill_skipped(
    cache: &mut KvCache,
    p: usize,
    c: usize,
    done: usize,
    r: usize,
    past: usize,
    t: usize,
) -> Result<()> {
    if done == 0 || done >= r {
        return Ok(());
    }
    for j in 0..c {
        let last = p + (done - 1) * c + j;
        let (k_new, v_new) = match cache.slots.get(last).and_then(Option::as_ref) {
            Some((k, v)) => (k.narrow(2, past, t)?, v.narrow(2, past, t)?),
            None => return Err(ModelError::Invalid(format!("KV slot {last} is empty"))),
        };
        for skipped in done..r {
            let i = p + skipped * c + j;
            if cache.slots.len() <= i {
                cache.slots.resize(i + 1, None);
            }
            let Some(slot) = cache.slots.get_mut(i) else {
                continue;
            };
            *slot = Some(match slot.take() {
                Some((k, v)) => (
                    Tensor::cat(&[&k, &k_new], 2)?,
                    Tensor::cat(&[&v, &v_new], 2)?,
                ),
                None if past == 0 => (k_new.clone(), v_new.clone()),
                None => {
                    return Err(ModelError::Invalid(format!(
                        "KV slot of recurrence {skipped} is empty after {past} tokens"
                    )))
                }
            });
        }
    }
    Ok(())
}

/// Picks the next token: argmax at temperature 0, else a draw from the top-p nucleus of
/// softmax(logits / temperature).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            (
                i as u32,
                ((f64::from(l) - f64::from(max)) / temperature).exp(),
            )
        })
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax();
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let target = top_p.clamp(0.0, 1.0) * total;
    let mut kept = 0.0;
    let mut n = 0;
    for (_, p) in &probs {
        kept += p;
        n += 1;
        if kept >= target {
            break;
        }
    }
    let mut u = rng.random::<f64>() * kept;
    for &(id, p) in &probs[..n] {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs[n - 1].0
}

/// Generates after `prompt`, calling `on_token` with every new token as soon as it is chosen.
/// The prompt is run in one pass at the full r; every generated token is then fed back one at
/// a time, with the early exit of `opts.exit`. Initial states are seeded from `opts.seed` and
/// the position, so a run is reproducible.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<GenerateReport> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid(
            "the prompt has no tokens to start from".into(),
        ));
    }
    let device = model.device().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut cache = KvCache::new();
    let started = std::time::Instant::now();
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), &device)?;
    let state = InitialState::Seeded(opts.seed);
    let (mut logits, _) = model.forward_step(&ids, opts.r, Exit::Never, state, &mut cache)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let decoding = std::time::Instant::now();
    let mut tokens = Vec::new();
    let mut recurrences = Vec::new();
    let mut stopped = "max_tokens";
    let mut steps = 0usize;
    while tokens.len() < opts.max_tokens {
        let next = sample(&logits, opts.temperature, opts.top_p, &mut rng);
        tokens.push(next);
        on_token(next)?;
        if opts.stop.contains(&next) {
            stopped = "stop_token";
            break;
        }
        if tokens.len() == opts.max_tokens {
            break;
        }
        let ids = Tensor::from_slice(&[next], (1, 1), &device)?;
        let position = (prompt.len() + tokens.len() - 1) as u64;
        let state = InitialState::Seeded(opts.seed.wrapping_add(position));
        let (l, iterations) = model.forward_step(&ids, opts.r, opts.exit, state, &mut cache)?;
        logits = l;
        steps += 1;
        if model.is_recurrent() {
            recurrences.push(iterations);
        }
    }
    let decode_seconds = decoding.elapsed().as_secs_f64();
    let mean_recurrence = (model.is_recurrent() && !recurrences.is_empty())
        .then(|| recurrences.iter().sum::<usize>() as f64 / recurrences.len() as f64);
    Ok(GenerateReport {
        prompt_tokens: prompt.len(),
        tokens_per_second: if steps > 0 {
            steps as f64 / decode_seconds.max(1e-9)
        } else {
            0.0
        },
        tokens,
        recurrences,
        mean_recurrence,
        stopped,
        prefill_seconds,
        decode_seconds,
    })
}
