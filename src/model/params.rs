//! The model's parameters by name (the recurrent layout's tensor names), for training and saving:
//! which ones train, with which optimizer, and making them candle `Var`s shared with the model.

use candle_core::{Tensor, Var};

use crate::arch::{LayerRole, Naming, Role};

use super::block::Norms;
use super::{Model, ModelError, Result};

/// Which parameters `heal` trains; the rest stay frozen.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Train {
    All,
    /// The core blocks only.
    Core,
    /// The adapter only.
    Adapter,
}

/// What kind of parameter this is: the optimizer split follows it (REFERENCE.md: Muon on every
/// 2-D block matrix and the adapter, AdamW on embeddings, lm_head and norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Matrix,
    Embedding,
    Norm,
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
        let blocks = self
            .prelude
            .iter_mut()
            .map(|b| (Part::Prelude, b))
            .chain(self.core.iter_mut().map(|b| (Part::Core, b)))
            .chain(self.coda.iter_mut().map(|b| (Part::Coda, b)));
        for (i, (part, block)) in blocks.enumerate() {
            let layer = |r: LayerRole| name(Role::Layer(i, r));
            let matrices = [
                (LayerRole::Qkv, &mut block.wqkv),
                (LayerRole::O, &mut block.wo),
                (LayerRole::GateUp, &mut block.w_gate_up),
                (LayerRole::Down, &mut block.w_down),
            ];
            for (role, weight) in matrices {
                out.push((layer(role), ParamKind::Matrix, part, weight.dense()?));
            }
            match &mut block.norms {
                Norms::Pre { attn, mlp } => {
                    out.push((layer(LayerRole::AttnNorm), ParamKind::Norm, part, attn));
                    out.push((layer(LayerRole::MlpNorm), ParamKind::Norm, part, mlp));
                }
                Norms::Post { attn, mlp, q, k } => {
                    out.push((layer(LayerRole::PostAttnNorm), ParamKind::Norm, part, attn));
                    out.push((layer(LayerRole::PostMlpNorm), ParamKind::Norm, part, mlp));
                    out.push((layer(LayerRole::QNorm), ParamKind::Norm, part, q));
                    out.push((layer(LayerRole::KNorm), ParamKind::Norm, part, k));
                }
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

    /// Every parameter with its name in the recurrent layout (values as the model has them now).
    pub fn named_tensors(&mut self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .walk()?
            .into_iter()
            .map(|(n, _, _, t)| (n, t.clone()))
            .collect())
    }

    /// Replaces every parameter with a fresh draw: N(0, 0.02) for matrices and embeddings, ones
    /// for norms, from a ChaCha8 generator seeded with `seed` (the paper's random-init baseline).
    /// `keep_adapter` leaves the adapter as loaded: the static model runs with it frozen, and an
    /// identity adapter is what makes r = 1 the plain stack of its blocks.
    pub fn reinitialize(&mut self, seed: u64, keep_adapter: bool) -> Result<()> {
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
                _ => (0..n).map(|_| normal.sample(&mut rng)).collect(),
            };
            *tensor = Tensor::from_vec(values, tensor.dims(), tensor.device())?;
        }
        Ok(())
    }
}
