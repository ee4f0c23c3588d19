//! `surgery plan --calibrate`, the measuring: scores every layer of a static source on
//! calibration text and ranks placements of the core by the perplexity of the pruned model each
//! starts from (issue 10; the results' types are `plan::calibrate`'s, as a plan records them). The
//! paper picked its layers by hand; this lets the data say which to drop before a byte is written.
//!
//! One base pass keeps the hidden state at every layer boundary (layers + 1 states per token;
//! 1.2 GB for SmolLM2 at 16k tokens). Everything else reruns only what changes, from that cache:
//! - block influence (ShortGPT, Men et al. 2024): 1 - the mean cosine similarity of a layer's
//!   input and output hidden states, over all tokens; a layer that computes the identity has 0;
//! - relative update: the mean of ||output - input|| / ||input|| over all tokens;
//! - removal perplexity: the source without that one layer, i.e. layers i+1.. run from the cached
//!   input of layer i;
//! - candidates: the pruned static model (prelude + core once + coda) that the identity adapter
//!   reproduces at every r (DESIGN.md decision 3). The prelude is the first P layers in every
//!   placement, so a candidate is its core and coda run from the cached state after the prelude.
//!
//! Removal and the first ranking pass read only the first `subset` tokens (on all tokens they
//! would cost about 17 and, per shape, about 8 full forwards of SmolLM2); the best `rescore`
//! placements of each shape and the paper's rule placement are then measured again on all of
//! them. Every number says on how many tokens.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, D};
use rayon::prelude::*;
use serde::Serialize;

use crate::eval::data::{read_tokens, windows, DataError, Window, Windows};
use crate::model::{Model, ModelError};
use crate::plan::calibrate::{Calibration, Candidate, LayerScore, Placement, ShapeCosts};
use crate::progress::Progress;
use crate::source::SourceModel;
use crate::tokenizer::text::{TextTokenizer, TextTokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    /// The calibration text holds fewer tokens than asked for.
    #[error("--calibrate {path}: the text has {tokens} tokens, but --calibrate-tokens {want} needs {need}; pass a smaller --calibrate-tokens or more text")]
    TooFewTokens {
        path: String,
        tokens: usize,
        want: usize,
        need: usize,
    },
    /// A count option out of range.
    #[error("{0}")]
    Invalid(String),
    /// The calibration text could not be read.
    #[error("--calibrate: {0}")]
    Data(#[from] DataError),
    /// The model has no usable tokenizer.
    #[error("--calibrate needs the model's tokenizer: {0}")]
    Tokenizer(#[from] TextTokenizerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A candidate's layer map or a plan of it.
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
}

impl From<candle_core::Error> for CalibrateError {
    fn from(e: candle_core::Error) -> Self {
        CalibrateError::Model(ModelError::Candle(e))
    }
}

pub type Result<T> = std::result::Result<T, CalibrateError>;

/// How much text each measurement reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibrateOptions {
    /// Tokens scored by the base pass (block influence, relative update, the source's perplexity)
    /// and by the re-scoring of the best candidates.
    pub tokens: usize,
    /// The first tokens of those that single-layer removal and the first ranking pass score.
    pub subset: usize,
    /// Tokens per window; each window starts without context.
    pub seq_len: usize,
    /// Placements of each shape measured again on all `tokens` after the first pass (besides
    /// the rule placement, which always is).
    pub rescore: usize,
}

/// Seconds spent in each stage, for the report (not in the plan: it would make plans of the same
/// inputs differ).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub base_pass: f64,
    pub removal: f64,
    pub ranking: f64,
    pub rescoring: f64,
    pub total: f64,
}

/// The calibration text, tokenized and cut into windows.
pub struct CalibrationText {
    /// The file as given, and its JSONL field.
    pub path: String,
    pub field: String,
    pub windows: Windows,
    pub documents: usize,
    pub skipped_invalid_utf8: usize,
}

/// Reads `path` (.txt or .jsonl with the text in `field`), tokenizes it with the model's tokenizer
/// and keeps the first `tokens` scored tokens in windows of `seq_len`. Refuses a text too short.
pub fn read_text(
    source: &SourceModel,
    path: &Path,
    field: &str,
    opts: &CalibrateOptions,
) -> Result<CalibrationText> {
    if opts.tokens < 1 || opts.seq_len < 1 || opts.subset < 1 {
        return Err(CalibrateError::Invalid(
            "--calibrate-tokens, --calibrate-subset and --calibrate-seq-len must be at least 1"
                .into(),
        ));
    }
    let tokenizer = TextTokenizer::for_model(source)?;
    // One token more than scored: the last target needs its input.
    let need = opts.tokens.saturating_add(1);
    let read = match read_tokens(&[path.to_path_buf()], Some(field), &tokenizer, Some(need)) {
        Err(DataError::TooShort { tokens }) => Err(tokens),
        Ok(s) if s.tokens.len() < need => Err(s.tokens.len()),
        other => Ok(other?),
    }
    .map_err(|tokens| CalibrateError::TooFewTokens {
        path: path.display().to_string(),
        tokens,
        want: opts.tokens,
        need,
    })?;
    Ok(CalibrationText {
        path: path.display().to_string(),
        field: field.to_string(),
        windows: windows(&read.tokens, opts.seq_len, Some(opts.tokens)),
        documents: read.documents,
        skipped_invalid_utf8: read.skipped_invalid_utf8,
    })
}

/// One window's cached hidden states: `states[i]` is the input of layer i, `states[n]` the last
/// layer's output, each (1, T, h).
struct Cached {
    states: Vec<Tensor>,
    /// (1, T) u32
    targets: Tensor,
}

/// The first `len` tokens of window `window`.
type View = (usize, usize);

/// Runs the calibration of a static `model` on `text` and measures `candidates` (from
/// [`placements`] or [`given`]); `shapes` carries each shape's costs. Deterministic: the same
/// inputs give bitwise the same scores.
pub fn calibrate(
    model: &Model,
    text: &CalibrationText,
    candidates: Vec<Candidate>,
    shapes: Vec<ShapeCosts>,
    opts: &CalibrateOptions,
    progress: &mut dyn Progress,
) -> Result<(Calibration, Timings)> {
    if model.is_recurrent() {
        return Err(CalibrateError::Invalid(
            "--calibrate scores a static model; this one is recurrent".into(),
        ));
    }
    let started = Instant::now();
    let mut timings = Timings::default();
    let n = model.n_blocks();
    // Every window whole, then the first `subset` tokens of them.
    let all: Vec<View> = (text.windows.windows.iter().map(|w| w.targets.len()))
        .enumerate()
        .collect();
    let tokens: usize = all.iter().map(|v| v.1).sum();
    let subset = prefix(&all, opts.subset);
    let subset_tokens: usize = subset.iter().map(|v| v.1).sum();

    // 1. The base pass: every boundary state of every window, and the per-layer similarities.
    let mut clock = Instant::now();
    let (cache, sums) = base_passes(model, &text.windows.windows, progress)?;
    let mut scores = Scores::new(model, &cache);
    let source = [(0..n).collect::<Vec<usize>>()];
    let source_perplexity = scores.perplexities(&source, &all, &mut |_| {})?[0];
    let source_subset_perplexity = scores.perplexities(&source, &subset, &mut |_| {})?[0];
    timings.base_pass = clock.elapsed().as_secs_f64();

    // 2. Single-layer removal on the subset: layers i+1.. from the cached input of layer i.
    clock = Instant::now();
    let (layers, drop_order) = layer_scores(&mut scores, &sums, &subset, progress)?;
    timings.removal = clock.elapsed().as_secs_f64();

    // 3. Every candidate on the subset, from the longest cached prefix of its layer list.
    clock = Instant::now();
    let mut candidates = candidates;
    let lists: Vec<Vec<usize>> = candidates.iter().map(Candidate::layers).collect();
    let what = "calibration: ranking (windows)";
    let ranked = scores.reported(what, &lists, &subset, progress)?;
    for (c, p) in candidates.iter_mut().zip(ranked) {
        c.subset_perplexity = p;
    }
    timings.ranking = clock.elapsed().as_secs_f64();

    // 4. The best placements of each shape again on all tokens (the subset may be all of them).
    clock = Instant::now();
    let rescore = if subset_tokens == tokens {
        candidates.len()
    } else {
        opts.rescore
    };
    rescore_best(&mut scores, &mut candidates, rescore, &all, progress)?;
    timings.rescoring = clock.elapsed().as_secs_f64();

    rank(&mut candidates);
    timings.total = started.elapsed().as_secs_f64();
    Ok((
        Calibration {
            data: text.path.clone(),
            field: text.field.clone(),
            documents: text.documents,
            tokens,
            subset_tokens,
            seq_len: text.windows.seq_len,
            rescored_per_shape: rescore.min(candidates.len()),
            source_perplexity,
            source_subset_perplexity,
            layers,
            drop_order,
            shapes,
            candidates,
        },
        timings,
    ))
}

/// Measures the best `rescore` candidates of each shape and the rule placements on `all` windows
/// (the subset's whole windows are not run again).
fn rescore_best(
    scores: &mut Scores,
    candidates: &mut [Candidate],
    rescore: usize,
    all: &[View],
    progress: &mut dyn Progress,
) -> Result<()> {
    let chosen = best_per_shape(candidates, rescore);
    let lists: Vec<Vec<usize>> = chosen.iter().map(|&k| candidates[k].layers()).collect();
    let what = "calibration: re-scoring on all tokens (windows)";
    let rescored = scores.reported(what, &lists, all, progress)?;
    for (&k, p) in chosen.iter().zip(rescored) {
        candidates[k].perplexity = Some(p);
    }
    Ok(())
}

/// Each layer's scores: its similarity sums over all tokens and the perplexity without it on
/// `subset`, and the layers in ShortGPT's drop order (lowest block influence first).
fn layer_scores(
    scores: &mut Scores,
    sums: &[LayerSums],
    subset: &[View],
    progress: &mut dyn Progress,
) -> Result<(Vec<LayerScore>, Vec<usize>)> {
    let n = sums.len();
    let removed: Vec<Vec<usize>> = (0..n)
        .map(|i| (0..n).filter(|&l| l != i).collect())
        .collect();
    let what = "calibration: single-layer removal (windows)";
    let removal = scores.reported(what, &removed, subset, progress)?;
    let layers: Vec<LayerScore> = (0..n)
        .zip(sums)
        .zip(removal)
        .map(|((i, s), removal)| s.score(i, removal))
        .collect();
    let mut drop_order: Vec<usize> = (0..n).collect();
    drop_order.sort_by(|&a, &b| {
        layers[a]
            .block_influence
            .total_cmp(&layers[b].block_influence)
    });
    Ok((layers, drop_order))
}

/// The windows' first `tokens` targets: whole windows, the last one cut (causal attention makes
/// a window's first tokens independent of the rest, so a cut cached state is exact).
fn prefix(all: &[View], tokens: usize) -> Vec<View> {
    let mut left = tokens;
    let mut out = Vec::new();
    for &(w, len) in all {
        if left == 0 {
            break;
        }
        out.push((w, len.min(left)));
        left -= len.min(left);
    }
    out
}

/// Running sums of one layer's similarity measures over tokens.
#[derive(Debug, Clone, Default)]
struct LayerSums {
    cos: f64,
    ratio: f64,
    count: usize,
}

impl LayerSums {
    /// Adds every token of `input` and `output` (1, T, h).
    fn add(&mut self, input: &Tensor, output: &Tensor) -> Result<()> {
        let per_token = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.sum_keepdim(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let dot = per_token((input * output)?)?;
        let a2 = per_token(input.sqr()?)?;
        let b2 = per_token(output.sqr()?)?;
        let d2 = per_token((output - input)?.sqr()?)?;
        for (((dot, a2), b2), d2) in dot.iter().zip(&a2).zip(&b2).zip(&d2) {
            let (dot, a2, b2, d2) = (*dot as f64, *a2 as f64, *b2 as f64, *d2 as f64);
            // A zero vector has no direction: equal to another zero vector, orthogonal to the rest.
            self.cos += if a2 > 0.0 && b2 > 0.0 {
                dot / (a2 * b2).sqrt()
            } else if a2 == b2 {
                1.0
            } else {
                0.0
            };
            self.ratio += if a2 > 0.0 { (d2 / a2).sqrt() } else { 0.0 };
            self.count += 1;
        }
        Ok(())
    }

    /// The scores of layer `layer` from its sums and its removal perplexity.
    fn score(&self, layer: usize, removal_perplexity: f64) -> LayerScore {
        LayerScore {
            layer,
            block_influence: 1.0 - self.cos / self.count as f64,
            relative_update: self.ratio / self.count as f64,
            removal_perplexity,
        }
    }

    fn merge(&mut self, other: &LayerSums) {
        self.cos += other.cos;
        self.ratio += other.ratio;
        self.count += other.count;
    }
}

/// How many windows or (layer list, window) pairs run at once: one per thread, each of whose
/// matrix products still splits over every thread. Running several windows side by side keeps
/// both cores busy through the serial parts of a forward (measured on SmolLM2, 2 threads: the
/// removal pass 15% faster than one window at a time).
fn parallel_jobs() -> usize {
    rayon::current_num_threads().max(1)
}

/// The base pass over `windows`, [`parallel_jobs`] at a time: each window's boundary states, and
/// each layer's similarity sums over all windows (added in window order).
fn base_passes(
    model: &Model,
    windows: &[Window],
    progress: &mut dyn Progress,
) -> Result<(Vec<Cached>, Vec<LayerSums>)> {
    progress.start("calibration: base pass (windows)", windows.len() as u64);
    let mut cache = Vec::with_capacity(windows.len());
    let mut sums = vec![LayerSums::default(); model.n_blocks()];
    for group in windows.chunks(parallel_jobs()) {
        let passes: Vec<Result<(Cached, Vec<LayerSums>)>> =
            group.par_iter().map(|w| base_pass(model, w)).collect();
        for pass in passes {
            let (cached, window_sums) = pass?;
            sums.iter_mut()
                .zip(&window_sums)
                .for_each(|(s, w)| s.merge(w));
            cache.push(cached);
        }
        progress.advance(cache.len() as u64);
    }
    progress.finish();
    Ok((cache, sums))
}

/// One window of the base pass: its boundary states, and each layer's similarity sums over it.
fn base_pass(model: &Model, w: &Window) -> Result<(Cached, Vec<LayerSums>)> {
    let device = model.device();
    let ids = Tensor::from_vec(w.inputs.clone(), (1, w.inputs.len()), device)?;
    let targets = Tensor::from_vec(w.targets.clone(), (1, w.targets.len()), device)?;
    let n = model.n_blocks();
    let mut x = model.embed(&ids)?;
    let mut states = Vec::with_capacity(n + 1);
    let mut sums = vec![LayerSums::default(); n];
    for (layer, sums) in sums.iter_mut().enumerate() {
        let output = model.run_blocks(&x, &[layer])?;
        sums.add(&x, &output)?;
        states.push(std::mem::replace(&mut x, output));
    }
    states.push(x);
    Ok((Cached { states, targets }, sums))
}

/// The summed next-token loss and token count of each (layer list, window view) measured so far:
/// the subset's whole windows, measured in ranking, are not measured again in re-scoring, nor
/// the source's in its subset perplexity. A window's sum does not depend on which pass asked for
/// it, so reusing one changes no bit.
struct Scores<'a> {
    model: &'a Model,
    cache: &'a [Cached],
    known: HashMap<(Vec<usize>, View), (f64, usize)>,
}

impl<'a> Scores<'a> {
    fn new(model: &'a Model, cache: &'a [Cached]) -> Self {
        Scores {
            model,
            cache,
            known: HashMap::new(),
        }
    }

    /// [`Scores::perplexities`] as one step of `progress`, named `what`, counted in (list, window)
    /// pairs.
    fn reported(
        &mut self,
        what: &str,
        lists: &[Vec<usize>],
        views: &[View],
        progress: &mut dyn Progress,
    ) -> Result<Vec<f64>> {
        progress.start(what, (lists.len() * views.len()) as u64);
        let out = self.perplexities(lists, views, &mut |k| progress.advance(k as u64))?;
        progress.finish();
        Ok(out)
    }

    /// The perplexity over `views` of each pruned static model `lists` names (source layers in
    /// order), each run from the cached state after the longest prefix of its layers that is 0,
    /// 1, 2, ...; `progress` gets the number of (list, window) pairs done. The pairs not known yet
    /// run [`parallel_jobs`] at a time; each list's windows are added in order, so the result
    /// does not depend on the thread count.
    fn perplexities(
        &mut self,
        lists: &[Vec<usize>],
        views: &[View],
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<f64>> {
        let mut jobs: Vec<(&[usize], View)> = Vec::new();
        for list in lists {
            for &view in views {
                let key = (list.clone(), view);
                if !self.known.contains_key(&key) && !jobs.contains(&(list, view)) {
                    jobs.push((list, view));
                }
            }
        }
        let already = lists.len() * views.len() - jobs.len();
        progress(already);
        for (g, group) in jobs.chunks(parallel_jobs()).enumerate() {
            let sums: Vec<Result<(f64, usize)>> = group
                .par_iter()
                .map(|&(list, view)| self.window(list, view))
                .collect();
            for (&(list, view), sum) in group.iter().zip(sums) {
                self.known.insert((list.to_vec(), view), sum?);
            }
            progress(already + g * parallel_jobs() + group.len());
        }
        lists
            .iter()
            .map(|list| {
                let (mut nll, mut count) = (0.0, 0);
                for &view in views {
                    let (sum, n) = self.known[&(list.clone(), view)];
                    nll += sum;
                    count += n;
                }
                Ok((nll / count.max(1) as f64).exp())
            })
            .collect()
    }

    /// The summed loss of the model `layers` on the first `len` tokens of window `w`.
    fn window(&self, layers: &[usize], (w, len): View) -> Result<(f64, usize)> {
        let start = layers
            .iter()
            .enumerate()
            .take_while(|&(i, &l)| i == l)
            .count();
        let window = self
            .cache
            .get(w)
            .ok_or_else(|| CalibrateError::Invalid(format!("no cached window {w}")))?;
        let state = window.states.get(start).ok_or_else(|| {
            CalibrateError::Invalid(format!("no cached state before layer {start}"))
        })?;
        let x = self
            .model
            .run_blocks(&state.narrow(1, 0, len)?, &layers[start..])?;
        Ok(self
            .model
            .head_nll(&x, &window.targets.narrow(1, 0, len)?)?)
    }
}

/// Indices of the `k` best candidates of each shape by subset perplexity (ties: listed first),
/// and of the paper's rule placement, so that the rule is always compared on all tokens.
fn best_per_shape(candidates: &[Candidate], k: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut shapes: Vec<&str> = candidates.iter().map(|c| c.shape.as_str()).collect();
    shapes.dedup();
    for shape in shapes {
        let mut of: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].shape == shape)
            .collect();
        of.sort_by(|&a, &b| {
            candidates[a]
                .subset_perplexity
                .total_cmp(&candidates[b].subset_perplexity)
        });
        let rule = of
            .iter()
            .copied()
            .find(|&i| candidates[i].placement == Placement::Rule);
        out.extend(of.into_iter().take(k));
        out.extend(rule);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Sorts best first: re-scored candidates by perplexity on all tokens, then the others by subset
/// perplexity; ties keep the enumeration order. Numbers the ranks from 1.
fn rank(candidates: &mut [Candidate]) {
    candidates.sort_by(|a, b| {
        let key = |c: &Candidate| {
            (
                c.perplexity.is_none(),
                c.perplexity.unwrap_or(c.subset_perplexity),
            )
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    });
    for (i, c) in candidates.iter_mut().enumerate() {
        c.rank = i + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::calibrate::placements;
    use crate::plan::Shape;

    #[test]
    fn prefix_cuts_the_last_window() {
        assert_eq!(prefix(&[(0, 4), (1, 4), (2, 2)], 6), vec![(0, 4), (1, 2)]);
        assert_eq!(prefix(&[(0, 4)], 9), vec![(0, 4)]);
    }

    #[test]
    fn ranking_puts_rescored_first() {
        let shape: Shape = "1,1,1".parse().unwrap();
        let mut cs = placements(shape, 5).unwrap();
        let ppl = [3.0, 1.0, 2.0];
        for (c, p) in cs.iter_mut().zip(ppl) {
            c.subset_perplexity = p;
        }
        // The two best, and the rule placement (the last block) besides.
        assert_eq!(best_per_shape(&cs, 1), vec![1, 2]);
        assert_eq!(best_per_shape(&cs, 2), vec![1, 2]);
        cs[2].subset_perplexity = 4.0;
        assert_eq!(best_per_shape(&cs, 1), vec![1, 2]);
        assert_eq!(best_per_shape(&cs, 2), vec![0, 1, 2]);
        cs[2].subset_perplexity = 2.0;
        cs[1].perplexity = Some(2.5);
        cs[2].perplexity = Some(2.4);
        rank(&mut cs);
        let order: Vec<(usize, String)> = cs.iter().map(|c| (c.rank, c.core_label())).collect();
        assert_eq!(
            order,
            vec![(1, "3..4".into()), (2, "2..3".into()), (3, "1..2".into())]
        );
    }
}
