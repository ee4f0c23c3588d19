//! The optimizers of healing over candle `Var`s, with state that a checkpoint saves and restores
//! exactly (REFERENCE.md, "Training"): Muon on the 2-D matrices of the blocks and the adapter,
//! AdamW on embeddings, lm_head and norms, in parameter groups as the paper's `train.py` builds
//! `MuonWithAuxAdam` (Keller Jordan's `muon` package). candle-nn's AdamW has neither parameter
//! groups nor a state export, hence this module. Also gradient clipping by global norm.
//!
//! Everything is computed in f32 on the variable's device; the moments are kept in f32 whatever
//! the variable's dtype, and a bf16 variable receives its f32 update rounded once per step.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::inplace;

/// Muon's learning rate (REFERENCE.md).
pub(crate) const MUON_LR: f64 = 1e-3;
/// Muon's decoupled weight decay.
pub(crate) const MUON_WEIGHT_DECAY: f64 = 1e-4;
/// Muon's momentum (always Nesterov, as the reference runs it).
pub(crate) const MUON_MOMENTUM: f64 = 0.95;
/// Newton-Schulz iterations per Muon step.
pub const NS_STEPS: usize = 5;
/// Keller Jordan's quintic coefficients (a, b, c): X <- a X + (b A + c A^2) X with A = X X^T.
/// Tuned for speed, not convergence: the singular values land in roughly [0.68, 1.13] instead of
/// exactly 1, which does not hurt training (Jordan, "Muon: An optimizer for hidden layers").
pub(crate) const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);
/// Added to the Frobenius norm before the Newton-Schulz iteration (a zero update stays zero).
pub(crate) const NS_EPS: f64 = 1e-7;
/// AdamW's learning rate (REFERENCE.md).
pub(crate) const ADAMW_LR: f64 = 5e-5;
/// AdamW's (beta1, beta2).
pub const ADAMW_BETAS: (f64, f64) = (0.9, 0.95);
/// AdamW's epsilon, added to the bias-corrected sqrt(v).
pub const ADAMW_EPS: f64 = 1e-8;
/// AdamW's decoupled weight decay.
pub(crate) const ADAMW_WEIGHT_DECAY: f64 = 1e-4;

/// Key of the optimizer step counter in [`Optimizer::state_tensors`]. It has no `.`, so it never
/// collides with a per-variable key, which is always `{var}.{suffix}`.
pub(crate) const STEP_KEY: &str = "step";
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const ADAM_STEPS: &str = "steps";
const MOMENTUM: &str = "momentum_buffer";

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// Two variables share a name (or one variable is listed twice): their states could not be
    /// told apart in a checkpoint, and the variable would be updated twice.
    #[error("variable {0:?} appears twice in the optimizer's groups; give each variable one name and one group")]
    Duplicate(String),
    /// Muon orthogonalizes matrices; put vectors (norms, biases) in an AdamW group.
    #[error(
        "variable {name:?} has shape {dims:?}; Muon needs a 2-D matrix, put it in an AdamW group"
    )]
    NotAMatrix { name: String, dims: Vec<usize> },
    /// A learning rate, weight decay or lr scale that is negative or not finite.
    #[error("{what} is {value}; it must be finite and non-negative")]
    BadHyperparameter { what: String, value: f64 },
    /// A checkpoint's state names a variable this optimizer does not have, or a moment its group's
    /// kind does not keep: the checkpoint belongs to another model or another optimizer setup.
    #[error("optimizer state {0:?} matches no variable of this optimizer (another model or another grouping?)")]
    UnknownState(String),
    /// A checkpoint's state lacks a tensor this optimizer needs (the step counter, or one moment of
    /// a pair): the file is truncated or was written by something else.
    #[error("optimizer state {0:?} is missing from the checkpoint")]
    MissingState(String),
    /// A saved moment whose shape is not its variable's.
    #[error("optimizer state {name:?} has shape {found:?}, its variable has {expected:?}")]
    StateShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A saved counter that is not one non-negative integer.
    #[error("optimizer state {0:?} is not a single non-negative step count")]
    BadCounter(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// Which update rule a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Momentum, Newton-Schulz orthogonalization, decoupled weight decay (2-D matrices only).
    Muon,
    /// Adam with bias correction and decoupled weight decay.
    AdamW,
}

/// Variables updated by one rule at one learning rate. `vars` pairs each variable with its name
/// in the checkpoint (the tensor name), which also names its optimizer state.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub name: String,
    pub vars: Vec<(String, Var)>,
    pub kind: Kind,
    pub lr: f64,
    pub weight_decay: f64,
}

impl ParamGroup {
    /// A Muon group with the reference's lr (1e-3) and weight decay (1e-4).
    pub fn muon(name: impl Into<String>, vars: Vec<(String, Var)>) -> Self {
        Self {
            name: name.into(),
            vars,
            kind: Kind::Muon,
            lr: MUON_LR,
            weight_decay: MUON_WEIGHT_DECAY,
        }
    }

    /// An AdamW group with the reference's lr (5e-5) and weight decay (1e-4).
    pub fn adamw(name: impl Into<String>, vars: Vec<(String, Var)>) -> Self {
        Self {
            name: name.into(),
            vars,
            kind: Kind::AdamW,
            lr: ADAMW_LR,
            weight_decay: ADAMW_WEIGHT_DECAY,
        }
    }
}

/// The state of one variable, created at its first gradient (as torch does).
#[derive(Debug, Clone)]
enum Moments {
    /// First and second moments, and the number of updates this variable has received (its own
    /// count, as torch keeps per parameter: a variable that skipped steps is bias-corrected for
    /// the updates it actually had).
    AdamW {
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        steps: u64,
    },
    /// The momentum buffer.
    Muon { momentum: Tensor },
}

/// Muon and AdamW over parameter groups, with exportable state.
#[derive(Debug)]
pub struct Optimizer {
    groups: Vec<ParamGroup>,
    state: BTreeMap<String, Moments>,
    step: u64,
}

impl Optimizer {
    /// Checks the groups: every variable named once, Muon variables 2-D, learning rates and
    /// weight decays finite and non-negative.
    pub fn new(groups: Vec<ParamGroup>) -> Result<Self> {
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for group in &groups {
            check_hyperparameter(&format!("group {:?} lr", group.name), group.lr)?;
            let what = format!("group {:?} weight decay", group.name);
            check_hyperparameter(&what, group.weight_decay)?;
            for (name, var) in &group.vars {
                if !names.insert(name.clone()) || !ids.insert(var.as_tensor().id()) {
                    return Err(OptimError::Duplicate(name.clone()));
                }
                if group.kind == Kind::Muon && var.rank() != 2 {
                    return Err(OptimError::NotAMatrix {
                        name: name.clone(),
                        dims: var.dims().to_vec(),
                    });
                }
            }
        }
        Ok(Self {
            groups,
            state: BTreeMap::new(),
            step: 0,
        })
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Every variable of every group, in group order (for [`clip_grad_norm`]).
    pub fn vars(&self) -> Vec<&Var> {
        self.groups
            .iter()
            .flat_map(|g| g.vars.iter().map(|(_, v)| v))
            .collect()
    }

    /// Optimizer steps taken (including those restored by [`Optimizer::load_state`]).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of every variable that has a gradient in `grads`, at each group's lr times
    /// `lr_scale` (the schedule's factor, [`crate::heal::schedule::learning_rate`] with base 1).
    /// Variables without a gradient are left unchanged, their state too.
    pub fn step(&mut self, grads: &GradStore, lr_scale: f64) -> Result<()> {
        check_hyperparameter("lr scale", lr_scale)?;
        for group in &self.groups {
            let lr = group.lr * lr_scale;
            for (name, var) in &group.vars {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let moments = self.state.get(name);
                if let Some(moments) = step_in_place(group, var, grad, moments, lr)? {
                    self.state.insert(name.clone(), moments);
                    continue;
                }
                let w = var.as_detached_tensor().to_dtype(DType::F32)?;
                let g = grad.detach().to_dtype(DType::F32)?;
                let (new_w, moments) = match group.kind {
                    Kind::AdamW => adamw_update(&w, &g, moments, lr, group.weight_decay)?,
                    Kind::Muon => muon_update(&w, &g, moments, lr, group.weight_decay)?,
                };
                var.set(&new_w.to_dtype(var.dtype())?)?;
                self.state.insert(name.clone(), moments);
            }
        }
        self.step += 1;
        Ok(())
    }

    /// The whole state as named tensors, for a checkpoint (a snapshot that shares storage with
    /// the live state, which the next [`Optimizer::step`] updates in place: write it first): `step` (the step counter, I64 scalar on
    /// the CPU), and per variable that has state `{var}.exp_avg`, `{var}.exp_avg_sq`,
    /// `{var}.steps` (AdamW) or `{var}.momentum_buffer` (Muon), the moments in f32 on the
    /// variable's device. [`Optimizer::load_state`] of these continues bit-identically.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(STEP_KEY.to_string(), counter(self.step)?)];
        for (name, moments) in &self.state {
            match moments {
                Moments::AdamW {
                    exp_avg,
                    exp_avg_sq,
                    steps,
                } => {
                    out.push((key(name, EXP_AVG), exp_avg.clone()));
                    out.push((key(name, EXP_AVG_SQ), exp_avg_sq.clone()));
                    out.push((key(name, ADAM_STEPS), counter(*steps)?));
                }
                Moments::Muon { momentum } => out.push((key(name, MOMENTUM), momentum.clone())),
            }
        }
        Ok(out)
    }

    /// Replaces the state with one saved by [`Optimizer::state_tensors`] (from any device: moments
    /// move to their variable's device, in f32). Every tensor must belong to a variable of this
    /// optimizer and each variable's state must be complete; a variable with no saved state
    /// starts fresh (it had no gradient before the save). On error the state is unchanged.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>) -> Result<()> {
        let step_tensor = tensors
            .remove(STEP_KEY)
            .ok_or_else(|| OptimError::MissingState(STEP_KEY.to_string()))?;
        let step = read_counter(STEP_KEY, &step_tensor)?;
        let mut state = BTreeMap::new();
        for group in &self.groups {
            for (name, var) in &group.vars {
                let moments = match group.kind {
                    Kind::AdamW => take_adamw(&mut tensors, name, var)?,
                    Kind::Muon => take_moment(&mut tensors, &key(name, MOMENTUM), var)?
                        .map(|momentum| Moments::Muon { momentum }),
                };
                if let Some(moments) = moments {
                    state.insert(name.clone(), moments);
                }
            }
        }
        if let Some(unknown) = tensors.into_keys().min() {
            return Err(OptimError::UnknownState(unknown));
        }
        self.state = state;
        self.step = step;
        Ok(())
    }
}

fn check_hyperparameter(what: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        return Ok(());
    }
    Err(OptimError::BadHyperparameter {
        what: what.to_string(),
        value,
    })
}

fn key(var: &str, suffix: &str) -> String {
    format!("{var}.{suffix}")
}

fn counter(value: u64) -> Result<Tensor> {
    // Step counts stay far below i64::MAX; saturate rather than wrap if one ever did not.
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    Ok(Tensor::new(value, &Device::Cpu)?)
}

fn read_counter(name: &str, t: &Tensor) -> Result<u64> {
    let bad = || OptimError::BadCounter(name.to_string());
    if t.elem_count() != 1 || !matches!(t.dtype(), DType::I64 | DType::U32 | DType::U8) {
        return Err(bad());
    }
    let value = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    value
        .first()
        .and_then(|v| u64::try_from(*v).ok())
        .ok_or_else(bad)
}

/// Removes `name` from `tensors` and checks it against `var`: same shape, moved to its device, f32.
fn take_moment(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    var: &Var,
) -> Result<Option<Tensor>> {
    let Some(t) = tensors.remove(name) else {
        return Ok(None);
    };
    if t.dims() != var.dims() {
        return Err(OptimError::StateShape {
            name: name.to_string(),
            expected: var.dims().to_vec(),
            found: t.dims().to_vec(),
        });
    }
    // A copy: the moments are updated in place (see `inplace`), and must not write through to
    // the caller's tensors.
    Ok(Some(
        t.to_device(var.device())?.to_dtype(DType::F32)?.copy()?,
    ))
}

/// An AdamW variable's state: all three tensors or none.
fn take_adamw(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    var: &Var,
) -> Result<Option<Moments>> {
    let exp_avg = take_moment(tensors, &key(name, EXP_AVG), var)?;
    let exp_avg_sq = take_moment(tensors, &key(name, EXP_AVG_SQ), var)?;
    let steps_key = key(name, ADAM_STEPS);
    let steps = tensors.remove(&steps_key);
    match (exp_avg, exp_avg_sq, steps) {
        (None, None, None) => Ok(None),
        (Some(exp_avg), Some(exp_avg_sq), Some(steps)) => Ok(Some(Moments::AdamW {
            exp_avg,
            exp_avg_sq,
            steps: read_counter(&steps_key, &steps)?,
        })),
        (None, _, _) => Err(OptimError::MissingState(key(name, EXP_AVG))),
        (_, None, _) => Err(OptimError::MissingState(key(name, EXP_AVG_SQ))),
        (_, _, None) => Err(OptimError::MissingState(steps_key)),
    }
}

/// [`Optimizer::step`] for one variable in place on every core, when the variable, its gradient
/// and its moments are contiguous f32 CPU tensors (`None`: use the composed ops). The same f32
/// arithmetic as [`adamw_update`] and [`muon_update`], so the same bits.
fn step_in_place(
    group: &ParamGroup,
    var: &Var,
    grad: &Tensor,
    moments: Option<&Moments>,
    lr: f64,
) -> Result<Option<Moments>> {
    let w = var.as_tensor();
    if !inplace::applies(w) || !inplace::applies(grad) {
        return Ok(None);
    }
    let step = inplace::DecayedStep {
        lr: lr as f32,
        lr_wd: (lr * group.weight_decay) as f32,
    };
    match (group.kind, moments) {
        (Kind::AdamW, None | Some(Moments::AdamW { .. })) => adamw_in_place(w, grad, moments, step),
        (Kind::Muon, None | Some(Moments::Muon { .. })) => muon_in_place(w, grad, moments, step),
        _ => Ok(None),
    }
}

/// [`step_in_place`]'s AdamW update of `w` and of its moments (fresh zeros when `None`; `None`
/// back when they are not contiguous f32 CPU tensors).
fn adamw_in_place(
    w: &Tensor,
    grad: &Tensor,
    moments: Option<&Moments>,
    step: inplace::DecayedStep,
) -> Result<Option<Moments>> {
    let (m, v, steps) = match moments {
        Some(Moments::AdamW {
            exp_avg,
            exp_avg_sq,
            steps,
        }) if inplace::applies(exp_avg) && inplace::applies(exp_avg_sq) => {
            (exp_avg.clone(), exp_avg_sq.clone(), *steps)
        }
        Some(_) => return Ok(None),
        None => (grad.zeros_like()?, grad.zeros_like()?, 0),
    };
    let (b1, b2) = ADAMW_BETAS;
    let steps = steps.saturating_add(1);
    let t = steps as f64;
    m.inplace_op2(
        grad,
        &inplace::Blend {
            keep: b1 as f32,
            take: (1.0 - b1) as f32,
            square: false,
        },
    )?;
    v.inplace_op2(
        grad,
        &inplace::Blend {
            keep: b2 as f32,
            take: (1.0 - b2) as f32,
            square: true,
        },
    )?;
    w.inplace_op3(
        &m,
        &v,
        &inplace::AdamWStep {
            inv_bias1: (1.0 / (1.0 - b1.powf(t))) as f32,
            inv_bias2_sqrt: (1.0 / (1.0 - b2.powf(t)).sqrt()) as f32,
            eps: ADAMW_EPS as f32,
            step,
        },
    )?;
    Ok(Some(Moments::AdamW {
        exp_avg: m,
        exp_avg_sq: v,
        steps,
    }))
}

/// [`step_in_place`]'s Muon update of `w` and of its momentum (fresh zeros when `None`; `None`
/// back when it is not a contiguous f32 CPU tensor).
fn muon_in_place(
    w: &Tensor,
    grad: &Tensor,
    moments: Option<&Moments>,
    step: inplace::DecayedStep,
) -> Result<Option<Moments>> {
    let buf = match moments {
        Some(Moments::Muon { momentum }) if inplace::applies(momentum) => momentum.clone(),
        Some(_) => return Ok(None),
        None => grad.zeros_like()?,
    };
    let beta = MUON_MOMENTUM;
    buf.inplace_op2(
        grad,
        &inplace::Blend {
            keep: beta as f32,
            take: (1.0 - beta) as f32,
            square: false,
        },
    )?;
    let nesterov = (grad.affine(1.0 - beta, 0.0)? + buf.affine(beta, 0.0)?)?;
    let (rows, cols) = grad.dims2()?;
    let scale = (rows as f64 / cols as f64).max(1.0).sqrt();
    let update = newton_schulz(&nesterov, NS_STEPS)?.affine(scale, 0.0)?;
    w.inplace_op2(&update, &step)?;
    Ok(Some(Moments::Muon { momentum: buf }))
}

/// w - lr * wd * w - lr * u, written so that a tiny lr * wd is not lost: `1 - lr * wd` in f32
/// rounds 1 - 1e-7 to 1 - 1.19e-7 (a fifth more decay than asked), `lr * wd * w` is exact to
/// f32 precision.
fn decayed_step(w: &Tensor, update: &Tensor, lr: f64, weight_decay: f64) -> Result<Tensor> {
    let decay = w.affine(lr * weight_decay, 0.0)?;
    Ok(((w - decay)? - update.affine(lr, 0.0)?)?)
}

/// AdamW as torch and `muon.adam_update` compute it, all tensors shaped like w:
///
/// ```text
/// m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t += 1
/// w = w - lr wd w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// ```
fn adamw_update(
    w: &Tensor,
    g: &Tensor,
    moments: Option<&Moments>,
    lr: f64,
    weight_decay: f64,
) -> Result<(Tensor, Moments)> {
    let (b1, b2) = ADAMW_BETAS;
    let (m, v, steps) = match moments {
        Some(Moments::AdamW {
            exp_avg,
            exp_avg_sq,
            steps,
        }) => (exp_avg.clone(), exp_avg_sq.clone(), *steps),
        // Kinds are fixed per variable at construction and load, so a Muon state never reaches
        // here; treat anything else as fresh.
        _ => (g.zeros_like()?, g.zeros_like()?, 0),
    };
    let steps = steps.saturating_add(1);
    let m = (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
    let v = (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
    let t = steps as f64;
    let bias1 = 1.0 - b1.powf(t);
    let bias2_sqrt = (1.0 - b2.powf(t)).sqrt();
    // sqrt(v) / sqrt(1 - b2^t) + eps, then m / that, scaled by 1 / (1 - b1^t) below.
    let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, ADAMW_EPS)?;
    let update = (m.div(&denom)?).affine(1.0 / bias1, 0.0)?;
    let new_w = decayed_step(w, &update, lr, weight_decay)?;
    let moments = Moments::AdamW {
        exp_avg: m,
        exp_avg_sq: v,
        steps,
    };
    Ok((new_w, moments))
}

/// Muon as `muon.muon_update` computes it (w, g, buffer: (rows, cols)):
///
/// ```text
/// buf = b buf + (1 - b) g                  momentum (torch's lerp)
/// u   = (1 - b) g + b buf                  Nesterov
/// O   = NewtonSchulz5(u)                   ~ the orthogonal factor U V^T of u
/// w   = w - lr wd w - lr sqrt(max(1, rows / cols)) O
/// ```
fn muon_update(
    w: &Tensor,
    g: &Tensor,
    moments: Option<&Moments>,
    lr: f64,
    weight_decay: f64,
) -> Result<(Tensor, Moments)> {
    let beta = MUON_MOMENTUM;
    let buf = match moments {
        Some(Moments::Muon { momentum }) => momentum.clone(),
        // See adamw_update: a foreign state never reaches here.
        _ => g.zeros_like()?,
    };
    let buf = (buf.affine(beta, 0.0)? + g.affine(1.0 - beta, 0.0)?)?;
    let nesterov = (g.affine(1.0 - beta, 0.0)? + buf.affine(beta, 0.0)?)?;
    let (rows, cols) = g.dims2()?;
    let scale = (rows as f64 / cols as f64).max(1.0).sqrt();
    let update = newton_schulz(&nesterov, NS_STEPS)?.affine(scale, 0.0)?;
    let new_w = decayed_step(w, &update, lr, weight_decay)?;
    Ok((new_w, Moments::Muon { momentum: buf }))
}

/// Keller Jordan's quintic Newton-Schulz iteration (`zeropower_via_newtonschulz5`), in f32: the
/// approximate orthogonal factor of a 2-D `g`, with singular values in about [0.68, 1.13].
///
/// Like the reference, a tall matrix is transposed first so the Gram matrix X X^T is the small
/// side, and X is normalised by its Frobenius norm (+ 1e-7) so every singular value starts <= 1.
pub fn newton_schulz(g: &Tensor, steps: usize) -> Result<Tensor> {
    let (rows, cols) = g.dims2()?;
    let (a, b, c) = NS_COEFFS;
    let tall = rows > cols;
    let g = g.to_dtype(DType::F32)?;
    // (s, l) with s = min(rows, cols), l = max(rows, cols)
    let x = if tall { g.t()?.contiguous()? } else { g };
    let norm = x.sqr()?.sum_all()?.sqrt()?.affine(1.0, NS_EPS)?; // ()
    let mut x = x.broadcast_div(&norm)?; // (s, l)
    for _ in 0..steps {
        let gram = x.matmul(&x.t()?)?; // (s, l) @ (l, s) -> (s, s)
        let poly = (gram.affine(b, 0.0)? + gram.matmul(&gram)?.affine(c, 0.0)?)?; // (s, s)
        x = (x.affine(a, 0.0)? + poly.matmul(&x)?)?; // (s, s) @ (s, l) -> (s, l)
    }
    if tall {
        return Ok(x.t()?.contiguous()?); // (rows, cols)
    }
    Ok(x)
}

/// Scales the gradients of `vars` in place so their global L2 norm is at most `max_norm`, as
/// torch's `clip_grad_norm_` does (coefficient max_norm / (norm + 1e-6), applied only when the
/// norm exceeds max_norm), and returns the norm before clipping.
///
/// Each tensor's sum of squares is reduced in f64 on every core for a contiguous f32 CPU tensor
/// (in f32 on its device otherwise: one value per tensor comes back), and those sums are
/// accumulated in f64. A non-finite norm is returned as it is and the
/// gradients are left alone: the caller stops the run. Variables without a gradient, and a
/// variable listed twice, count once or not at all.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let mut seen = HashSet::new();
    let with_grad: Vec<&Var> = vars
        .iter()
        .copied()
        .filter(|v| seen.insert(v.as_tensor().id()) && grads.get(v.as_tensor()).is_some())
        .collect();
    let mut sum_sq = 0f64;
    for var in &with_grad {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum_sq += match inplace::sum_of_squares(g) {
                Some(s) => s,
                None => f64::from(
                    g.to_dtype(DType::F32)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f32>()?,
                ),
            };
        }
    }
    let norm = sum_sq.sqrt();
    if !norm.is_finite() || norm <= max_norm {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    for var in with_grad {
        if let Some(g) = grads.remove(var.as_tensor()) {
            grads.insert(var.as_tensor(), g.affine(coef, 0.0)?);
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(values: &[f32], dims: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, dims, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn rejects_muon_on_a_vector() {
        let err = Optimizer::new(vec![ParamGroup::muon(
            "m",
            vec![("b".into(), var(&[1.0], &[1]))],
        )]);
        assert!(matches!(err, Err(OptimError::NotAMatrix { .. })));
    }

    #[test]
    fn rejects_a_name_twice() {
        let a = var(&[1.0], &[1]);
        let b = var(&[2.0], &[1]);
        let groups = vec![
            ParamGroup::adamw("x", vec![("w".into(), a)]),
            ParamGroup::adamw("y", vec![("w".into(), b)]),
        ];
        assert!(matches!(
            Optimizer::new(groups),
            Err(OptimError::Duplicate(_))
        ));
    }

    #[test]
    fn rejects_a_variable_twice() {
        let a = var(&[1.0], &[1]);
        let group = ParamGroup::adamw("x", vec![("w".into(), a.clone()), ("v".into(), a)]);
        assert!(matches!(
            Optimizer::new(vec![group]),
            Err(OptimError::Duplicate(_))
        ));
    }

    #[test]
    fn rejects_a_negative_lr() {
        let mut group = ParamGroup::adamw("x", vec![("w".into(), var(&[1.0], &[1]))]);
        group.lr = -1.0;
        let err = Optimizer::new(vec![group]);
        assert!(matches!(err, Err(OptimError::BadHyperparameter { .. })));
    }

    #[test]
    fn rejects_a_nan_lr_scale() {
        let w = var(&[1.0], &[1]);
        let grads = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut opt = Optimizer::new(vec![ParamGroup::adamw("x", vec![("w".into(), w)])]).unwrap();
        let err = opt.step(&grads, f64::NAN);
        assert!(matches!(err, Err(OptimError::BadHyperparameter { .. })));
    }

    fn stepped_adamw() -> (Optimizer, Var) {
        let w = var(&[1.0, 2.0], &[2]);
        let grads = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut opt =
            Optimizer::new(vec![ParamGroup::adamw("x", vec![("w".into(), w.clone())])]).unwrap();
        opt.step(&grads, 1.0).unwrap();
        (opt, w)
    }

    #[test]
    fn load_rejects_unknown_state() {
        let (mut opt, _) = stepped_adamw();
        let mut state: HashMap<_, _> = opt.state_tensors().unwrap().into_iter().collect();
        state.insert(
            "other.exp_avg".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(matches!(
            opt.load_state(state),
            Err(OptimError::UnknownState(_))
        ));
    }

    #[test]
    fn load_rejects_half_a_state() {
        let (mut opt, _) = stepped_adamw();
        let mut state: HashMap<_, _> = opt.state_tensors().unwrap().into_iter().collect();
        state.remove("w.exp_avg_sq");
        assert!(matches!(
            opt.load_state(state),
            Err(OptimError::MissingState(_))
        ));
    }

    #[test]
    fn load_rejects_a_missing_step() {
        let (mut opt, _) = stepped_adamw();
        let mut state: HashMap<_, _> = opt.state_tensors().unwrap().into_iter().collect();
        state.remove(STEP_KEY);
        assert!(matches!(
            opt.load_state(state),
            Err(OptimError::MissingState(_))
        ));
    }

    #[test]
    fn load_rejects_a_wrong_shape() {
        let (mut opt, _) = stepped_adamw();
        let mut state: HashMap<_, _> = opt.state_tensors().unwrap().into_iter().collect();
        state.insert(
            "w.exp_avg".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(matches!(
            opt.load_state(state),
            Err(OptimError::StateShape { .. })
        ));
    }

    #[test]
    fn load_rejects_a_negative_counter() {
        let (mut opt, _) = stepped_adamw();
        let mut state: HashMap<_, _> = opt.state_tensors().unwrap().into_iter().collect();
        state.insert(STEP_KEY.into(), Tensor::new(-1i64, &Device::Cpu).unwrap());
        assert!(matches!(
            opt.load_state(state),
            Err(OptimError::BadCounter(_))
        ));
    }

    #[test]
    fn failed_load_keeps_the_state() {
        let (mut opt, _) = stepped_adamw();
        let before = opt.state_tensors().unwrap().len();
        let _ = opt.load_state(HashMap::new());
        assert_eq!(opt.state_tensors().unwrap().len(), before);
        assert_eq!(opt.step_count(), 1);
    }

    #[test]
    fn no_gradient_no_change() {
        let a = var(&[1.0, 2.0], &[2]);
        let b = var(&[3.0, 4.0], &[2]);
        let grads = a
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let group = ParamGroup::adamw("x", vec![("a".into(), a.clone()), ("b".into(), b.clone())]);
        let mut opt = Optimizer::new(vec![group]).unwrap();
        opt.step(&grads, 1.0).unwrap();
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
        assert_ne!(a.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        let keys: Vec<String> = opt
            .state_tensors()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["step", "a.exp_avg", "a.exp_avg_sq", "a.steps"]);
    }

    #[test]
    fn bf16_variable_is_updated() {
        let w = Var::from_tensor(
            &Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let loss = w
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut group = ParamGroup::muon("m", vec![("w".into(), w.clone())]);
        group.lr = 0.1;
        let mut opt = Optimizer::new(vec![group]).unwrap();
        opt.step(&grads, 1.0).unwrap();
        assert_eq!(w.dtype(), DType::BF16);
        let after = w
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(after.to_scalar::<f32>().unwrap() < 30.0);
    }

    /// Pseudo-random values in [-1, 1) from a fixed LCG (no rand dependency in the test).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// The in-place kernels give the composed ops' bits, for both rules, over several steps
    /// (moments carried), with weight decay, on a matrix larger than one parallel chunk.
    #[test]
    fn in_place_steps_equal_the_composed_updates_bit_for_bit() {
        let (rows, cols) = (129, 301);
        for kind in [Kind::AdamW, Kind::Muon] {
            let w0 = Tensor::from_vec(values(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
            let var = Var::from_tensor(&w0).unwrap();
            let group = ParamGroup {
                name: "g".into(),
                vars: vec![("w".into(), var.clone())],
                kind,
                lr: 1e-2,
                weight_decay: 0.1,
            };
            let mut opt = Optimizer::new(vec![group]).unwrap();
            let (mut w, mut moments) = (w0.copy().unwrap(), None);
            for step in 0..3 {
                let g =
                    Tensor::from_vec(values(rows * cols, 10 + step), (rows, cols), &Device::Cpu)
                        .unwrap();
                let mut grads = var.as_tensor().sum_all().unwrap().backward().unwrap();
                grads.insert(var.as_tensor(), g.clone());
                opt.step(&grads, 0.5).unwrap();
                let (new_w, new_moments) = match kind {
                    Kind::AdamW => adamw_update(&w, &g, moments.as_ref(), 5e-3, 0.1).unwrap(),
                    Kind::Muon => muon_update(&w, &g, moments.as_ref(), 5e-3, 0.1).unwrap(),
                };
                (w, moments) = (new_w, Some(new_moments));
                assert_eq!(bits(var.as_tensor()), bits(&w), "{kind:?} step {step}");
            }
            let state: HashMap<_, _> = opt.state_tensors().unwrap().into_iter().collect();
            match moments.unwrap() {
                Moments::AdamW {
                    exp_avg,
                    exp_avg_sq,
                    ..
                } => {
                    assert_eq!(bits(&state["w.exp_avg"]), bits(&exp_avg));
                    assert_eq!(bits(&state["w.exp_avg_sq"]), bits(&exp_avg_sq));
                }
                Moments::Muon { momentum } => {
                    assert_eq!(bits(&state["w.momentum_buffer"]), bits(&momentum));
                }
            }
        }
    }
}
