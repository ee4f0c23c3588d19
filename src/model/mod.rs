//! The model in candle: embeddings, prelude, adapter, core applied r times, coda, final norm,
//! lm_head (REFERENCE.md, "Forward pass"). The same code runs a static source model (all its
//! layers, or any subset: the pruned model), so every variant is measured by one runtime.
//!
//! Every op here is differentiable (no fused `softmax_last_dim`, `rms_norm` or `rope` of candle's,
//! which record no gradient), so the trainer can use this forward as it is. The hot ops run as
//! our own fused ops with their backward (`fused/`) unless [`Kernels::Composed`] is chosen.

mod block;
pub mod fused;
mod generate;
pub mod memory;
pub mod params;
pub mod qkernels;
mod rope;
mod stepwise;
mod weight;

use candle_core::{DType as CDType, Device, IndexOp, Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::arch::{LayerRole, Role};
use crate::formats::hf_config::{Family, ModelConfig};
use crate::source::SourceModel;

pub(crate) use block::Block;

/// The composed differentiable ops the fused ones are proved against (tests, benchmarks).
pub mod composed {
    pub use super::block::{rms_norm, swiglu};
    pub use super::rope::apply as rope;
    pub use super::{mean_cross_entropy, mean_distillation};
}
pub(crate) use fused::xent::Parts;
pub use fused::xent::{Mix, Teacher, IGNORED};
pub use fused::Kernels;
pub use generate::{generate, sample, Exit, GenerateOptions, GenerateReport};
pub use rope::Rope;
pub use weight::{kept_as_stored, Part, Weight};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor could not be read from the checkpoint.
    #[error("{name}: {reason}")]
    Load { name: String, reason: String },
    /// A request the model cannot serve (a layer out of range, a cache used at another r).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// How the initial state s_0 of a forward pass is chosen.
#[derive(Debug, Clone, Copy)]
pub enum InitialState<'a> {
    /// Drawn from the model's distribution (truncated normal of its sigma, or zero) by a ChaCha8
    /// generator with this seed: the same seed gives the same numbers.
    Seeded(u64),
    /// Given explicitly, [B, T, h] (the golden vectors of the reference do this).
    Given(&'a Tensor),
}

/// How a pass runs the core.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Core iterations (the most, with an exit).
    r: usize,
    /// The state is detached after each of the first this many iterations.
    without_grad: usize,
    exit: Exit,
}

impl Run {
    /// All `r` iterations (no exit), the state detached after the first `without_grad`.
    fn fixed(r: usize, without_grad: usize) -> Run {
        Run {
            r,
            without_grad,
            exit: Exit::Never,
        }
    }
}

/// One slot of keys and values per (block run): prelude i -> i, core (recurrence k, layer j) ->
/// P + k C + j, coda i -> P + r C + i (REFERENCE.md: reusing a slot across recurrences is wrong).
#[derive(Debug, Default)]
pub struct KvCache {
    slots: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens cached so far.
    pub len: usize,
    r: Option<usize>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of slots in use: P + r C + K once a forward has run.
    pub fn slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

/// The model: a recurrent checkpoint, or a static one (then everything is the "prelude", r = 0).
pub struct Model {
    pub config: ModelConfig,
    embed: Tensor,
    prelude: Vec<Block>,
    core: Vec<Block>,
    coda: Vec<Block>,
    /// [h, 2h]: columns 0..h read the state, h..2h the prelude output e.
    adapter: Option<Weight>,
    final_norm: Tensor,
    lm_head: Weight,
    rope: Rope,
    /// sigma of the initial state (0: zero state).
    state_std: f64,
    device: Device,
    /// Fused or composed hot ops (see [`Kernels`]).
    kernels: Kernels,
}

/// How a model holds block-quantized GGUF matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Dequantized to f32: exact values, trainable.
    F32,
    /// As stored (Q4_0, Q8_0 and the k-quants, see [`weight::kept_as_stored`]): they take their
    /// stored size in memory and multiply as llama.cpp does, activations rounded to the blocks'
    /// dot type (see [`Weight`]). Embeddings, norms, float tensors and the other block types are
    /// f32. Training dequantizes what it trains.
    Stored,
}

/// Reads a checkpoint's tensors onto a device.
struct Loader<'a> {
    source: &'a SourceModel,
    device: &'a Device,
    /// Keep block-quantized GGUF matrices as stored (see [`Weight::Quantized`]).
    keep_quantized: bool,
}

impl<'a> Loader<'a> {
    fn tensor_ref(&self, role: Role) -> Result<&'a crate::source::TensorRef> {
        self.source.tensor(role).ok_or_else(|| ModelError::Load {
            name: format!("{role}"),
            reason: "missing".into(),
        })
    }

    fn tensor(&self, role: Role) -> Result<Tensor> {
        let t = self.tensor_ref(role)?;
        let values = self.source.read_f32(t).map_err(|e| ModelError::Load {
            name: t.name.clone(),
            reason: e.to_string(),
        })?;
        Ok(Tensor::from_vec(values, t.shape.as_slice(), self.device)?)
    }

    /// The matrix whose rows are those of `roles`' tensors, in order.
    fn weight(&self, roles: &[Role]) -> Result<Weight> {
        let refs = roles
            .iter()
            .map(|&role| self.tensor_ref(role))
            .collect::<Result<Vec<_>>>()?;
        let kept = |t: &crate::source::TensorRef| {
            if t.parts.is_empty() {
                weight::kept_as_stored(t.dtype)
            } else {
                t.parts.iter().all(|p| weight::kept_as_stored(p.dtype))
            }
        };
        if self.keep_quantized && refs.iter().all(|t| kept(t)) {
            let mut parts = Vec::new();
            for t in refs {
                let load_error = |e: crate::formats::gguf::GgufError| ModelError::Load {
                    name: t.name.clone(),
                    reason: e.to_string(),
                };
                for (part, bytes) in self.source.stored_rows(t).map_err(load_error)? {
                    let &[rows, cols] = part.shape.as_slice() else {
                        return Err(ModelError::Load {
                            name: part.name.clone(),
                            reason: format!("a matrix, not of shape {:?}", part.shape),
                        });
                    };
                    parts.push(
                        weight::Part::new(part.dtype, &bytes, (rows, cols), self.device)
                            .map_err(load_error)?,
                    );
                }
            }
            return Ok(Weight::Quantized(parts));
        }
        let values = roles
            .iter()
            .map(|&role| self.tensor(role))
            .collect::<Result<Vec<_>>>()?;
        Ok(Weight::Dense(Tensor::cat(&values, 0)?))
    }
}

impl Model {
    /// Loads any checkpoint: a recurrent one as prelude, core and coda; a static one with all its
    /// layers. Every weight becomes f32 (GGUF blocks are dequantized exactly), as training and
    /// reference checks need.
    pub fn load(source: &SourceModel, device: &Device) -> Result<Model> {
        Model::load_as(source, None, device, Weights::F32)
    }

    /// A static model over the given source layers, in that order: all of them for the source
    /// model, or the source with some removed (the pruned model the identity adapter reproduces).
    pub fn load_static(source: &SourceModel, layers: &[usize], device: &Device) -> Result<Model> {
        Model::load_as(source, Some(layers), device, Weights::F32)
    }

    /// [`Model::load`] (or [`Model::load_static`] with `layers`), holding the weights as `weights`
    /// says.
    pub fn load_as(
        source: &SourceModel,
        layers: Option<&[usize]>,
        device: &Device,
        weights: Weights,
    ) -> Result<Model> {
        let loader = Loader {
            source,
            device,
            keep_quantized: weights == Weights::Stored,
        };
        let shape = match (source.config.recurrent, layers) {
            (None, layers) => {
                let all = (0..source.config.n_layers).collect::<Vec<_>>();
                return Model::static_from(&loader, layers.unwrap_or(&all));
            }
            (Some(_), Some(_)) => {
                return Err(ModelError::Invalid(
                    "a layer subset needs a static checkpoint".into(),
                ))
            }
            (Some(shape), None) => shape,
        };
        let block = |i: usize| Block::load_recurrent(&loader, i);
        let (p, c) = (shape.prelude, shape.core);
        let prelude = (0..p).map(block).collect::<Result<Vec<_>>>()?;
        let core = (p..p + c).map(block).collect::<Result<Vec<_>>>()?;
        let coda = (p + c..p + c + shape.coda)
            .map(block)
            .collect::<Result<Vec<_>>>()?;
        let adapter = if shape.adapter {
            Some(loader.weight(&[Role::Adapter])?)
        } else {
            None
        };
        Model::assemble(&loader, prelude, core, coda, adapter, shape.state_std)
    }

    fn static_from(loader: &Loader, layers: &[usize]) -> Result<Model> {
        let source = loader.source;
        let blocks = layers
            .iter()
            .map(|&i| {
                if i >= source.config.n_layers {
                    return Err(ModelError::Invalid(format!(
                        "layer {i} is out of range: the model has {} layers",
                        source.config.n_layers
                    )));
                }
                Block::load_source(loader, i)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut config = source.config.clone();
        config.n_layers = layers.len();
        let mut model = Model::assemble(loader, blocks, vec![], vec![], None, 0.0)?;
        model.config = config;
        Ok(model)
    }

    fn assemble(
        loader: &Loader,
        prelude: Vec<Block>,
        core: Vec<Block>,
        coda: Vec<Block>,
        adapter: Option<Weight>,
        state_std: f64,
    ) -> Result<Model> {
        let source = loader.source;
        let embed = loader.tensor(Role::Embed)?;
        // A tied source has no lm_head tensor: the embeddings serve as both.
        let lm_head = match source.tensor(Role::LmHead) {
            Some(_) => loader.weight(&[Role::LmHead])?,
            None if loader.keep_quantized => loader.weight(&[Role::Embed])?,
            None => Weight::Dense(embed.clone()),
        };
        Ok(Model {
            config: source.config.clone(),
            rope: Rope::new(&source.config),
            embed,
            prelude,
            core,
            coda,
            adapter,
            final_norm: loader.tensor(Role::FinalNorm)?,
            lm_head,
            state_std,
            device: loader.device.clone(),
            kernels: Kernels::default(),
        })
    }

    /// True for a recurrent model (a core to loop).
    pub fn is_recurrent(&self) -> bool {
        !self.core.is_empty()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the hot ops fused (the default) or composed (the reference path).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Block runs per token at recurrence r: P + r C + K (the KV slots a token needs).
    pub fn block_runs(&self, r: usize) -> usize {
        self.prelude.len() + r * self.core.len() + self.coda.len()
    }

    /// Logits [B, T, V] for `ids` [B, T] (u32) at recurrence `r` (ignored by a static model).
    ///
    /// `mask` [B, T] (u32, 1 for a token, 0 for padding) makes padded batches exact: padding keys
    /// are never attended to and positions count real tokens only, so a left- or right-padded
    /// row gives its tokens the logits of the row run alone. `cache` decodes incrementally (no
    /// mask then): keys and values are kept per block run, and later calls continue at
    /// position `cache.len`.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        r: usize,
        state: InitialState,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_detached(ids, mask, r, 0, state, cache)
    }

    /// [`Model::forward`] for truncated backpropagation through the recurrence (REFERENCE.md,
    /// "Training"): the state is detached after each of the first `without_grad` of the `r`
    /// iterations, so only the last `r - without_grad` carry gradient, and the graphs of the
    /// detached iterations are freed as soon as they are done (memory does not grow with r).
    pub fn forward_detached(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        r: usize,
        without_grad: usize,
        state: InitialState,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let run = Run::fixed(r, without_grad);
        let (x, _) = self.hidden(ids, mask, run, state, cache)?;
        let x = self.normed(&x)?;
        // (B, T, h) @ (h, V) -> (B, T, V)
        Ok(self.lm_head.forward(&x)?)
    }

    /// The training loss: the mean next-token cross-entropy of `ids` [B, T] against `targets`
    /// [B, T] (u32) at recurrence `r`, the state detached after the first `without_grad`
    /// iterations (see [`Model::forward_detached`]); a differentiable scalar. With fused kernels
    /// lm_head and the loss are one op that never holds the [B T, V] logits; composed, it is
    /// [`mean_cross_entropy`] of [`Model::forward_detached`].
    pub fn loss(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        r: usize,
        without_grad: usize,
        state: InitialState,
    ) -> Result<Tensor> {
        Ok(self
            .loss_parts(ids, targets, r, without_grad, state, None)?
            .0)
    }

    /// [`Model::loss`], or with a `teacher` (from [`Model::teacher`] on the same `ids`) the
    /// distillation loss alpha CE + (1 - alpha) T^2 KL(teacher_T || student_T), mean over tokens,
    /// and its two parts. Fused, neither model's [B T, V] logits are held whole; composed, it is
    /// [`mean_distillation`] of the full logits.
    pub fn loss_parts(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        r: usize,
        without_grad: usize,
        state: InitialState,
        teacher: Option<&Teacher>,
    ) -> Result<(Tensor, Option<Parts>)> {
        let run = Run::fixed(r, without_grad);
        let (x, _) = self.hidden(ids, None, run, state, None)?;
        let x = self.normed(&x)?;
        let h = x.dim(D::Minus1)?;
        let Some(w) = self.fused_head(&x) else {
            // (B, T, h) @ (h, V) -> (B, T, V)
            let logits = self.lm_head.forward(&x)?;
            let Some(t) = teacher else {
                return Ok((mean_cross_entropy(&logits, targets)?, None));
            };
            // (N, d_t) @ (d_t, V) -> (N, V), N = B T
            let teacher_logits = block::linear(&t.h, &t.w)?;
            let v = teacher_logits.dim(D::Minus1)?;
            let (loss, parts) = mean_distillation(
                &logits.reshape(((), v))?,
                &teacher_logits,
                &targets.flatten_all()?,
                t.mix,
            )?;
            return Ok((loss, Some(parts)));
        };
        // (B, T, h) -> (B T, h)
        let rows = x.reshape(((), h))?;
        let targets = targets.flatten_all()?.to_vec1::<u32>()?;
        let scored = targets.iter().filter(|&&t| t != IGNORED).count();
        let scale = 1.0 / scored.max(1) as f64;
        // lm_head and the loss: (B T, h) -> ()
        Ok(match teacher {
            None => (
                fused::xent::linear_cross_entropy(&rows, w, &targets, scale)?,
                None,
            ),
            Some(t) => {
                let (loss, parts) = fused::xent::linear_distillation(&rows, w, t, &targets, scale)?;
                (loss, Some(parts))
            }
        })
    }

    /// This model as the teacher of a distillation step on `ids` [B, T]: its hidden states after
    /// the final norm (B T, h), without gradient, at recurrence `r` from `state` (a static model
    /// ignores both), and its lm_head, dequantized if stored in blocks (once: it is kept so).
    pub fn teacher(
        &mut self,
        ids: &Tensor,
        r: usize,
        state: InitialState,
        mix: Mix,
    ) -> Result<Teacher> {
        let run = Run::fixed(r, r);
        let (x, _) = self.hidden(ids, None, run, state, None)?;
        let x = self.normed(&x)?.detach();
        let h = x.dim(D::Minus1)?;
        let w = self.lm_head.dense()?.detach();
        Ok(Teacher {
            h: x.reshape(((), h))?,
            w,
            mix,
        })
    }

    /// The summed next-token cross-entropy (nats) of `ids` [B, T] against `targets` [B, T] (u32),
    /// each token weighted by `weights` [B, T] (f32; 0 leaves a padding token out), and the sum
    /// of the weights: what [`crate::eval::perplexity`] adds up. `mask` as in
    /// [`Model::forward`]. Fused kernels never hold the [B T, V] logits.
    pub fn nll_sum(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        targets: &Tensor,
        weights: &Tensor,
        r: usize,
        state: InitialState,
    ) -> Result<(f64, f64)> {
        let run = Run::fixed(r, 0);
        let (x, _) = self.hidden(ids, mask, run, state, None)?;
        let x = self.normed(&x)?;
        let Some(w) = self.fused_head(&x) else {
            // (B, T, h) @ (h, V) -> (B, T, V)
            return cross_entropy_sum(&self.lm_head.forward(&x)?, targets, weights);
        };
        let h = x.dim(D::Minus1)?;
        let targets = targets.flatten_all()?.to_vec1::<u32>()?;
        let weights = weights
            .flatten_all()?
            .to_dtype(CDType::F64)?
            .to_vec1::<f64>()?;
        // (B, T, h) -> (B T, h) -> B T values
        let nll = fused::xent::nll_rows(&x.reshape(((), h))?, w, &targets)?;
        let (mut total, mut count) = (0.0, 0.0);
        for (nll, weight) in nll.iter().zip(&weights) {
            // Skipped, not multiplied by 0: a padding row's value never reaches the sum.
            if *weight != 0.0 {
                total += weight * nll;
                count += weight;
            }
        }
        Ok((total, count))
    }

    /// The final RMSNorm, fused or composed as the kernels say: (.., h) -> (.., h).
    fn normed(&self, x: &Tensor) -> Result<Tensor> {
        Ok(block::norm(
            x,
            &self.final_norm,
            self.config.norm_eps,
            self.kernels,
        )?)
    }

    /// lm_head's values when the fused head serves the normed hidden states `x`: fused kernels,
    /// CPU, f32/f64, and a dense (not block-quantized) lm_head.
    fn fused_head(&self, x: &Tensor) -> Option<&Tensor> {
        match &self.lm_head {
            Weight::Dense(w) if self.kernels.fused_for(x) => Some(w),
            _ => None,
        }
    }

    /// Embeddings, prelude, the core looped as `run` says, coda: the hidden states (B, T, h)
    /// before the final norm, and the core iterations run. Skipped iterations' cache slots get
    /// the last computed iteration's keys and values (see [`Model::forward_step`]).
    fn hidden(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        run: Run,
        state: InitialState,
        mut cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, usize)> {
        let (b, t) = ids.dims2()?;
        let r = run.r;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = cache.as_deref_mut() {
            if mask.is_some() {
                return Err(ModelError::Invalid(
                    "a KV cache cannot be used with a padding mask".into(),
                ));
            }
            if let Some(held) = c.r.filter(|&held| held != r) {
                return Err(ModelError::Invalid(format!(
                    "this KV cache holds recurrence {held} and cannot serve r = {r}"
                )));
            }
        }
        // Everything follows the weights' dtype (f32; f64 for gradient checks).
        let dtype = self.embed.dtype();
        let frame = self.frame(mask, b, t, past, dtype)?;
        let ctx = frame.context(&self.config, self.kernels);

        // (B, T) -> (B, T, h)
        let mut x = self.embed(ids)?;
        for (i, block) in self.prelude.iter().enumerate() {
            x = block.forward(&x, &ctx, slot_at(&mut cache, i))?;
        }
        let iterations = if self.is_recurrent() {
            let (s, iterations) = self.recur(&x, run, state, &ctx, &mut cache)?;
            if let Some(cache) = cache.as_deref_mut() {
                let (p, c) = (self.prelude.len(), self.core.len());
                generate::fill_skipped(cache, p, c, iterations, r, past, t)?;
            }
            x = s;
            iterations
        } else {
            0
        };
        let coda_start = self.block_runs(r) - self.coda.len();
        for (i, block) in self.coda.iter().enumerate() {
            x = block.forward(&x, &ctx, slot_at(&mut cache, coda_start + i))?;
        }
        if let Some(c) = cache {
            // Bound to r only once a forward at r has succeeded.
            c.r = Some(r);
            c.len += t;
        }
        Ok((x, iterations))
    }

    /// The core looped as `run` says on the prelude's output `e`, from the initial state `state`
    /// (e itself without an adapter): the last state and the iterations run, fewer than r when
    /// the latent-difference exit stops early.
    fn recur(
        &self,
        e: &Tensor,
        run: Run,
        state: InitialState,
        ctx: &block::Context,
        cache: &mut Option<&mut KvCache>,
    ) -> Result<(Tensor, usize)> {
        let (p, c) = (self.prelude.len(), self.core.len());
        let mut s = match (&self.adapter, state) {
            // No adapter: the state starts as e and the core is applied to it r times.
            (None, _) => e.clone(),
            (Some(_), InitialState::Given(s0)) => s0.clone(),
            (Some(_), InitialState::Seeded(seed)) => self.initial_state(e.dims(), seed)?,
        };
        let mut iterations = 0;
        for k in 0..run.r {
            let previous = s.clone();
            if let Some(adapter) = &self.adapter {
                // concat on the hidden axis, state first: (B, T, 2h) @ (2h, h) -> (B, T, h)
                s = adapter.forward(&Tensor::cat(&[&s, e], D::Minus1)?)?;
            }
            for (j, block) in self.core.iter().enumerate() {
                s = block.forward(&s, ctx, slot_at(cache, p + k * c + j))?;
            }
            if k < run.without_grad {
                s = s.detach();
            }
            iterations = k + 1;
            // s_0 is noise, not a computed state: the first comparison is s_2 with s_1.
            if let Exit::LatentDiff(eps) = run.exit {
                if iterations >= 2
                    && iterations < run.r
                    && generate::relative_change(&s, &previous)? < eps
                {
                    break;
                }
            }
        }
        Ok((s, iterations))
    }

    /// s_0: a normal of the model's sigma truncated at +-3 sigma (resampled beyond), or zeros.
    fn initial_state(&self, dims: &[usize], seed: u64) -> Result<Tensor> {
        if self.state_std == 0.0 {
            return Ok(Tensor::zeros(dims, self.embed.dtype(), &self.device)?);
        }
        let n: usize = dims.iter().product();
        let normal =
            Normal::new(0.0f64, self.state_std).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..n)
            .map(|_| loop {
                let v = normal.sample(&mut rng);
                if v.abs() <= 3.0 * self.state_std {
                    break v as f32;
                }
            })
            .collect();
        Ok(Tensor::from_vec(values, dims, &self.device)?.to_dtype(self.embed.dtype())?)
    }

    /// The same model with every parameter converted to `dtype` (f64 for finite-difference
    /// gradient checks).
    pub fn to_dtype(mut self, dtype: CDType) -> Result<Model> {
        if self.config.recurrent.is_none() {
            return Err(ModelError::Invalid(
                "to_dtype converts recurrent models".into(),
            ));
        }
        for (_, _, _, t) in self.walk()? {
            *t = t.to_dtype(dtype)?;
        }
        Ok(self)
    }
}

/// The KV slot `i` of the cache, if there is a cache.
fn slot_at<'a>(
    cache: &'a mut Option<&mut KvCache>,
    i: usize,
) -> Option<&'a mut Option<(Tensor, Tensor)>> {
    let slots = &mut cache.as_deref_mut()?.slots;
    if slots.len() <= i {
        slots.resize(i + 1, None);
    }
    slots.get_mut(i)
}

/// What every block of one pass shares, owned: the attention mask and the RoPE tables of the
/// pass's positions, in the weights' dtype.
struct Frame {
    /// The additive bias [B, 1, T, past + T] of the composed attention; absent where the fused
    /// attention serves the pass (it reads `mask`, and a bias of B T^2 values is never built).
    bias: Option<Tensor>,
    mask: fused::attention::Mask,
    cos: Tensor,
    sin: Tensor,
}

impl Frame {
    fn context<'a>(&'a self, config: &'a ModelConfig, kernels: Kernels) -> block::Context<'a> {
        block::Context {
            bias: self.bias.as_ref(),
            mask: &self.mask,
            cos: &self.cos,
            sin: &self.sin,
            config,
            kernels,
        }
    }
}

impl Model {
    /// Token embeddings: ids (B, T) u32 -> (B, T, h).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden))?)
    }

    /// The frame of a pass over (B, T) tokens after `past` cached ones, padding keys masked.
    fn frame(
        &self,
        mask: Option<&Tensor>,
        b: usize,
        t: usize,
        past: usize,
        dtype: CDType,
    ) -> Result<Frame> {
        let (positions, mask) = positions_and_mask(mask, b, t, past, &self.device)?;
        let (cos, sin) = self.rope.cos_sin(&positions)?;
        let bias = if self.kernels.fused_on(&self.device, dtype) {
            None
        } else {
            Some(bias_of(&mask, b, t, &self.device)?.to_dtype(dtype)?)
        };
        Ok(Frame {
            bias,
            mask,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }
}

/// Positions [B, T] (u32), and the attention mask: causal, and padding keys masked. Positions
/// count real tokens only, so padding never shifts RoPE.
fn positions_and_mask(
    mask: Option<&Tensor>,
    b: usize,
    t: usize,
    past: usize,
    device: &Device,
) -> Result<(Tensor, fused::attention::Mask)> {
    let valid: Vec<Vec<u32>> = match mask {
        Some(m) => m.to_dtype(CDType::U32)?.to_vec2::<u32>()?,
        None => vec![vec![1; t]; b],
    };
    let mut positions = Vec::with_capacity(b * t);
    // [B, past + T]: cached keys are real (a padding mask cannot be combined with the cache).
    let mut real_keys = Vec::with_capacity(b * (past + t));
    for row in &valid {
        real_keys.extend(std::iter::repeat_n(true, past));
        real_keys.extend(row.iter().map(|&v| v != 0));
        // A token's position is the number of real tokens before it (padding does not count).
        let mut real = past as u32;
        for &v in row {
            positions.push(real);
            real += u32::from(v != 0);
        }
    }
    let positions = Tensor::from_vec(positions, (b, t), device)?;
    let mask = fused::attention::Mask::Causal {
        past,
        valid: real_keys.into(),
    };
    Ok((positions, mask))
}

/// The composed attention's additive bias [B, 1, T, past + T] (f32) of a causal `mask` over B
/// rows of T queries: 0 where query q may read key k (k <= past + q, and k real), -1e9 elsewhere.
fn bias_of(mask: &fused::attention::Mask, b: usize, t: usize, device: &Device) -> Result<Tensor> {
    let fused::attention::Mask::Causal { past, valid } = mask else {
        return Err(ModelError::Invalid(
            "a bias is built from a causal mask".into(),
        ));
    };
    let keys = past + t;
    let mut bias = Vec::with_capacity(b * t * keys);
    for row in valid.chunks(keys.max(1)).take(b) {
        for q in 0..t {
            for (k, &real) in row.iter().enumerate() {
                bias.push(if k <= past + q && real { 0.0f32 } else { -1e9 });
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, keys), device)?)
}

/// Mean next-token cross-entropy (natural log) of `logits` [B, T, V] against `targets` [B, T]
/// (u32) where `weights` [B, T] (f32) is 1, and the number of such tokens.
pub(crate) fn cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<(f64, f64)> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let logsumexp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?;
    // -log p(target) = logsumexp - picked, per token: (B, T)
    let nll = (logsumexp - picked)?.squeeze(D::Minus1)?;
    let total = (nll * weights)?.sum_all()?.to_scalar::<f32>()? as f64;
    let count = weights.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((total, count))
}

/// Mean next-token cross-entropy of `logits` [B, T, V] against `targets` [B, T], differentiable
/// (the max is detached: logsumexp's gradient does not depend on the shift), over the targets
/// that are not [`IGNORED`]. The composed reference of the fused loss in [`Model::loss`].
pub fn mean_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let logsumexp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let (targets, scored) = scored_targets(targets, logits.dtype())?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?;
    scored_mean(&(logsumexp - picked)?.squeeze(D::Minus1)?, &scored)
}

/// `targets` with every [`IGNORED`] one replaced by 0 (any index will do: its loss is weighted
/// out), and a weight of 1 for each scored target and 0 for the others, in `dtype`.
fn scored_targets(targets: &Tensor, dtype: CDType) -> candle_core::Result<(Tensor, Tensor)> {
    let ignored = targets.eq(IGNORED)?;
    let zeros = targets.zeros_like()?;
    let scored = ignored.ones_like()?.sub(&ignored)?.to_dtype(dtype)?;
    Ok((ignored.where_cond(&zeros, targets)?, scored))
}

/// The mean of `values` weighted by `scored` (0 or 1, same shape): over the scored entries.
fn scored_mean(values: &Tensor, scored: &Tensor) -> candle_core::Result<Tensor> {
    let count = scored
        .sum_all()?
        .to_dtype(CDType::F64)?
        .to_scalar::<f64>()?;
    (values * scored)?.sum_all()? / count.max(1.0)
}

/// The composed reference of the fused distillation loss: alpha CE + (1 - alpha) T^2
/// KL(softmax(teacher / T) || softmax(logits / T)), mean over rows, of `logits` and
/// `teacher_logits` (N, V) against `targets` (N) (u32), differentiable in `logits`; and its parts.
pub fn mean_distillation(
    logits: &Tensor,
    teacher_logits: &Tensor,
    targets: &Tensor,
    mix: Mix,
) -> Result<(Tensor, Parts)> {
    let t = mix.temperature;
    let ce = mean_cross_entropy(&logits.unsqueeze(0)?, &targets.unsqueeze(0)?)?;
    let at_t = |x: &Tensor| -> candle_core::Result<Tensor> {
        let x = (x / t)?;
        let max = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&max)?;
        let logsumexp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        shifted.broadcast_sub(&logsumexp)
    };
    let log_q = at_t(logits)?;
    let log_p = at_t(&teacher_logits.detach())?;
    // sum_v p (log p - log q), mean over the scored rows
    let (_, scored) = scored_targets(targets, logits.dtype())?;
    let kl = scored_mean(&(log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)?, &scored)?;
    let loss = ((&ce * mix.alpha)? + (&kl * ((1.0 - mix.alpha) * t * t))?)?;
    let value = |x: &Tensor| -> candle_core::Result<f64> { x.to_dtype(CDType::F64)?.to_scalar() };
    let parts = Parts {
        ce: value(&ce)?,
        kl: value(&kl)?,
    };
    Ok((loss, parts))
}

/// Rows of `logits` [B, T, V] as log-probabilities (for tests and generation).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let logsumexp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&logsumexp)?)
}

/// The last position's logits of row 0, as a Vec (for tests and generation).
pub fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits.i((0, t - 1))?.to_vec1::<f32>()?)
}

impl Block {
    fn load_source(loader: &Loader, i: usize) -> Result<Block> {
        use LayerRole::*;
        let rows = |parts: &[LayerRole]| {
            loader.weight(&parts.iter().map(|&p| Role::Layer(i, p)).collect::<Vec<_>>())
        };
        Block::new(
            loader,
            i,
            rows(&[Q, K, V])?,
            rows(&[O])?,
            rows(&[Gate, Up])?,
            rows(&[Down])?,
        )
    }

    fn load_recurrent(loader: &Loader, i: usize) -> Result<Block> {
        use LayerRole::*;
        let get = |r: LayerRole| loader.weight(&[Role::Layer(i, r)]);
        Block::new(loader, i, get(Qkv)?, get(O)?, get(GateUp)?, get(Down)?)
    }

    fn new(
        loader: &Loader,
        i: usize,
        wqkv: Weight,
        wo: Weight,
        w_gate_up: Weight,
        w_down: Weight,
    ) -> Result<Block> {
        use LayerRole::*;
        let get = |r: LayerRole| loader.tensor(Role::Layer(i, r));
        let family = loader.source.config.family;
        let norms = match family {
            Family::Llama | Family::Qwen2 => block::Norms::Pre {
                attn: get(AttnNorm)?,
                mlp: get(MlpNorm)?,
            },
            Family::Qwen3 => block::Norms::PreHeads {
                attn: get(AttnNorm)?,
                mlp: get(MlpNorm)?,
                q: get(QNorm)?,
                k: get(KNorm)?,
            },
            Family::Olmo2 => block::Norms::Post {
                attn: get(PostAttnNorm)?,
                mlp: get(PostMlpNorm)?,
                q: get(QNorm)?,
                k: get(KNorm)?,
            },
        };
        // The recurrent layout stores the fused bias; a source, one per projection.
        let qkv_bias = if !family.qkv_bias() {
            None
        } else if loader.source.config.recurrent.is_some() {
            Some(get(QkvBias)?)
        } else {
            Some(Tensor::cat(&[get(QBias)?, get(KBias)?, get(VBias)?], 0)?)
        };
        Ok(Block {
            norms,
            wqkv,
            qkv_bias,
            wo,
            w_gate_up,
            w_down,
        })
    }
}
