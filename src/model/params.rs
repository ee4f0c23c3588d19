//! The model's parameters by name (the recurrent layout's tensor names), for training and saving:
//! which ones train, with which optimizer, and making them candle `Var`s shared with the model.

use candle_core::{Tensor, Var};

use crate::arch::{LayerRole, Naming, Role};

use super::block::{Block, Norms};
use super::weight::LowRank;
use super::{Model, ModelError, Result, Weight};

crate::named::named! {
    /// Which parameters `heal` trains; the rest stay frozen.
    pub enum Train {
        All = "all",
        /// The core blocks only.
        Core = "core",
        /// The adapter only.
        Adapter = "adapter",
    }
}

/// `heal --lora RANK[:ALPHA]`: low-rank updates of the block matrices, scaled by alpha / rank.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    pub rank: usize,
    pub alpha: f64,
}

impl std::str::FromStr for Lora {
    type Err = String;

    /// `RANK` (alpha = rank: the update at scale 1) or `RANK:ALPHA`.
    fn from_str(s: &str) -> std::result::Result<Lora, String> {
        let (rank, alpha) = s.split_once(':').unwrap_or((s, ""));
        let rank: usize = rank
            .parse()
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| format!("{s:?}: RANK must be a whole number of at least 1"))?;
        let alpha = if alpha.is_empty() {
            rank as f64
        } else {
            alpha
                .parse::<f64>()
                .ok()
                .filter(|a| a.is_finite() && *a > 0.0)
                .ok_or_else(|| format!("{s:?}: ALPHA must be a positive number"))?
        };
        Ok(Lora { rank, alpha })
    }
}

/// What kind of parameter this is: the optimizer split follows it (REFERENCE.md: Muon on every
/// 2-D block matrix and the adapter, AdamW on embeddings, lm_head, norms and biases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Matrix,
    Embedding,
    Norm,
    /// Qwen2's q/k/v biases (1-D, zero at a fresh init).
    Bias,
}

/// A trainable parameter: its checkpoint name, its kind, and the Var the model computes with.
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
    pub var: Var,
}

/// Where a parameter lives, for the closure-based walk below.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Outside,
    Prelude,
    Core,
    Coda,
    Adapter,
}

/// A block's four matrices by role, its norms, and its q/k/v bias if it has one.
type BlockParts<'a> = (
    [(LayerRole, &'a mut Weight); 4],
    &'a mut Norms,
    Option<&'a mut Tensor>,
);

/// A block's four matrices by role, its norms, and its q/k/v bias if it has one.
fn matrices(block: &mut Block) -> BlockParts<'_> {
    let Block {
        norms,
        wqkv,
        qkv_bias,
        wo,
        w_gate_up,
        w_down,
    } = block;
    let matrices = [
        (LayerRole::Qkv, wqkv),
        (LayerRole::O, wo),
        (LayerRole::GateUp, w_gate_up),
        (LayerRole::Down, w_down),
    ];
    (matrices, norms, qkv_bias.as_mut())
}

/// A block's norms by role.
fn norm_roles(norms: &mut Norms) -> Vec<(LayerRole, &mut Tensor)> {
    use LayerRole::*;
    match norms {
        Norms::Pre { attn, mlp } => vec![(AttnNorm, attn), (MlpNorm, mlp)],
        Norms::PreHeads { attn, mlp, q, k } => {
            vec![(AttnNorm, attn), (MlpNorm, mlp), (QNorm, q), (KNorm, k)]
        }
        Norms::Post { attn, mlp, q, k } => vec![
            (PostAttnNorm, attn),
            (PostMlpNorm, mlp),
            (QNorm, q),
            (KNorm, k),
        ],
    }
}

/// Prelude, core and coda blocks in order (their index is the block's in the recurrent layout),
/// each with its part.
fn blocks<'a>(
    prelude: &'a mut [Block],
    core: &'a mut [Block],
    coda: &'a mut [Block],
) -> impl Iterator<Item = (Part, &'a mut Block)> {
    let prelude = prelude.iter_mut().map(|b| (Part::Prelude, b));
    let core = core.iter_mut().map(|b| (Part::Core, b));
    let coda = coda.iter_mut().map(|b| (Part::Coda, b));
    prelude.chain(core).chain(coda)
}

impl Model {
    /// Every parameter: (name in the recurrent layout, kind, part, &mut tensor).
    pub(super) fn walk(&mut self) -> Result<Vec<(String, ParamKind, Part, &mut Tensor)>> {
        let shape = self.config.recurrent.ok_or_else(|| {
            ModelError::Invalid("only a recurrent model has named parameters to train".into())
        })?;
        let naming = Naming::Raven(self.config.family, shape);
        let name = |role: Role| naming.name(role).unwrap_or_default();
        let mut out = vec![
            (
                name(Role::Embed),
                ParamKind::Embedding,
                Part::Outside,
                &mut self.embed,
            ),
            (
                name(Role::FinalNorm),
                ParamKind::Norm,
                Part::Outside,
                &mut self.final_norm,
            ),
            (
                name(Role::LmHead),
                ParamKind::Embedding,
                Part::Outside,
                self.lm_head.dense()?,
            ),
        ];
        if let Some(adapter) = &mut self.adapter {
            out.push((
                name(Role::Adapter),
                ParamKind::Matrix,
                Part::Adapter,
                adapter.dense()?,
            ));
        }
        let all = blocks(&mut self.prelude, &mut self.core, &mut self.coda);
        for (i, (part, block)) in all.enumerate() {
            let layer = |r: LayerRole| name(Role::Layer(i, r));
            let (weights, norms, bias) = matrices(block);
            for (role, weight) in weights {
                out.push((layer(role), ParamKind::Matrix, part, weight.dense()?));
            }
            if let Some(bias) = bias {
                out.push((layer(LayerRole::QkvBias), ParamKind::Bias, part, bias));
            }
            for (role, norm) in norm_roles(norms) {
                out.push((layer(role), ParamKind::Norm, part, norm));
            }
        }
        Ok(out)
    }

    /// Makes the parameters `which` selects trainable (each becomes a `Var` that the model
    /// computes with) and returns them; `frozen_adapter` keeps the adapter out (the `--static`
    /// baseline, where the adapter is not part of the model).
    pub fn trainable(&mut self, which: Train, frozen_adapter: bool) -> Result<Vec<Param>> {
        let mut params = Vec::new();
        for (name, kind, part, tensor) in self.walk()? {
            let trains = match which {
                Train::All => part != Part::Adapter || !frozen_adapter,
                Train::Core => part == Part::Core,
                Train::Adapter => part == Part::Adapter && !frozen_adapter,
            };
            if trains {
                let var = Var::from_tensor(tensor)?;
                *tensor = var.as_tensor().clone();
                params.push(Param { name, kind, var });
            }
        }
        Ok(params)
    }

    /// `heal --lora`: the block matrices `which` selects (prelude, core and coda for `all`, the
    /// core's for `core`) get a low-rank update B A of `lora.rank`, A uniform in +-1/sqrt(in)
    /// from a ChaCha8 generator seeded with `seed` and B zero, so that the model computes exactly
    /// what it did; their bases and every other weight stay frozen, except the adapter, which
    /// trains whole as `which` and `frozen_adapter` say. Returns what trains: A and B of each
    /// matrix (named `<matrix>.lora_a`, `.lora_b`) and the adapter.
    pub fn trainable_lora(
        &mut self,
        which: Train,
        lora: Lora,
        seed: u64,
        frozen_adapter: bool,
    ) -> Result<Vec<Param>> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let shape = self.config.recurrent.ok_or_else(|| {
            ModelError::Invalid("only a recurrent model has named parameters to train".into())
        })?;
        let naming = Naming::Raven(self.config.family, shape);
        let mut params = Vec::new();
        if let Some(adapter) = &mut self.adapter {
            if matches!(which, Train::All | Train::Adapter) && !frozen_adapter {
                let var = Var::from_tensor(adapter.dense()?)?;
                *adapter = Weight::Dense(var.as_tensor().clone());
                let name = naming.name(Role::Adapter).unwrap_or_default();
                params.push(Param {
                    name,
                    kind: ParamKind::Matrix,
                    var,
                });
            }
        }
        let (device, dtype) = (self.embed.device().clone(), self.embed.dtype());
        let all = blocks(&mut self.prelude, &mut self.core, &mut self.coda);
        for (i, (part, block)) in all.enumerate() {
            let low_rank = match which {
                Train::All => true,
                Train::Core => part == Part::Core,
                Train::Adapter => false,
            };
            if !low_rank {
                continue;
            }
            for (role, weight) in matrices(block).0 {
                let name = naming.name(Role::Layer(i, role)).unwrap_or_default();
                let (out, inp) = (weight.dim(0)?, weight.dim(1)?);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..lora.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(
                    &Tensor::from_vec(a, (lora.rank, inp), &device)?.to_dtype(dtype)?,
                )?;
                let b = Var::from_tensor(&Tensor::zeros((out, lora.rank), dtype, &device)?)?;
                let base = std::mem::replace(weight, Weight::Quantized(vec![]));
                *weight = Weight::LowRank(Box::new(LowRank {
                    base,
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: lora.alpha / lora.rank as f64,
                }));
                for (suffix, var) in [("lora_a", a), ("lora_b", b)] {
                    params.push(Param {
                        name: format!("{name}.{suffix}"),
                        kind: ParamKind::Matrix,
                        var,
                    });
                }
            }
        }
        Ok(params)
    }

    /// Every parameter with its name in the recurrent layout (values as the model has them now).
    pub fn named_tensors(&mut self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .walk()?
            .into_iter()
            .map(|(n, _, _, t)| (n, t.clone()))
            .collect())
    }

    /// Replaces every parameter with a fresh draw: N(0, 0.02) for matrices and embeddings, ones
    /// for norms, zeros for biases, from a ChaCha8 generator seeded with `seed` (the paper's random-init baseline).
    /// `keep_adapter` leaves the adapter as loaded: the static model runs with it frozen, and an
    /// identity adapter is what makes r = 1 the plain stack of its blocks.
    pub(crate) fn reinitialize(&mut self, seed: u64, keep_adapter: bool) -> Result<()> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| ModelError::Invalid(e.to_string()))?;
        for (_, kind, part, tensor) in self.walk()? {
            if keep_adapter && part == Part::Adapter {
                continue;
            }
            let n = tensor.elem_count();
            let values: Vec<f32> = match kind {
                ParamKind::Norm => vec![1.0; n],
                ParamKind::Bias => vec![0.0; n],
                _ => (0..n).map(|_| normal.sample(&mut rng)).collect(),
            };
            *tensor = Tensor::from_vec(values, tensor.dims(), tensor.device())?;
        }
        Ok(())
    }
}
