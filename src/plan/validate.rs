//! `Plan::validate`: the plan against itself, before `apply` opens a source file. A plan is data
//! anyone may have edited, so every entry that decides a byte of the output is checked against
//! the others: the layer map against the config's shape and the source's depth, every tensor
//! against the config (names, shapes, dtypes, byte counts, transforms), every tensor's sources
//! against the layer map, and the config's record of the map against the plan's.
//! A plan edited consistently is applied as edited; one whose entries disagree is refused with a
//! one-line error naming the entry. (`surgery::check` then holds the plan against the source
//! files as they are now.)

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use crate::arch::{self, Naming, Role};
use crate::formats::hf_config::{self, ModelConfig};

use super::{Layers, OutputFile, Plan, PlanError, TensorSpec, Transform, PLAN_VERSION};

fn invalid(msg: String) -> PlanError {
    PlanError::Invalid(msg)
}

impl Plan {
    /// Checks that the plan is complete and consistent, and returns the output config it
    /// describes.
    pub fn validate(&self) -> Result<ModelConfig, PlanError> {
        if self.plan_version != PLAN_VERSION {
            return Err(invalid(format!(
                "plan_version {} is not supported (this tool reads version {PLAN_VERSION})",
                self.plan_version
            )));
        }
        let config_bytes = serde_json::to_vec(&self.config).map_err(|e| invalid(e.to_string()))?;
        let config = hf_config::parse(&config_bytes)
            .map_err(|e| invalid(format!("the plan's config: {e}")))?;
        let Some(shape) = config.recurrent else {
            return Err(invalid(
                "plan config: model_type must be huginn_raven".into(),
            ));
        };
        let layers = self.layers.shape();
        if (layers.prelude, layers.core, layers.coda) != (shape.prelude, shape.core, shape.coda) {
            return Err(invalid(format!(
                "plan layers ({layers}) disagree with the config's ({},{},{})",
                shape.prelude, shape.core, shape.coda
            )));
        }
        for (name, range) in self.layers.named() {
            if range.end > self.source.n_layers {
                return Err(PlanError::OutOfBounds {
                    part: name,
                    range,
                    n_layers: self.source.n_layers,
                });
            }
        }

        let source = match self.source.format.as_str() {
            "gguf" => Naming::Gguf,
            "safetensors" => Naming::HuggingFace(self.source.family),
            other => return Err(invalid(format!("unknown source format {other:?}"))),
        };

        let naming = Naming::Raven(config.family, shape);
        let mut want: BTreeMap<String, (Role, Vec<usize>)> = BTreeMap::new();
        for role in arch::required_roles(&config) {
            let name = naming.name(role).unwrap_or_default();
            want.insert(name, (role, arch::expected_shape(&config, role)));
        }
        let mut seen = HashSet::new();
        let files: HashSet<&str> = self.source.files.iter().map(|f| f.path.as_str()).collect();
        for t in &self.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(invalid(format!("tensor {:?} is listed twice", t.name)));
            }
            let Some((role, shape)) = want.get(&t.name) else {
                return Err(invalid(format!(
                    "tensor {:?} is not part of a ({}) {} model",
                    t.name,
                    layers,
                    config.family.name()
                )));
            };
            if &t.shape != shape {
                return Err(invalid(format!(
                    "tensor {:?} has shape {:?}, but the config implies {shape:?}",
                    t.name, t.shape
                )));
            }
            tensor(t, *role, &files)?;
            self.reads_its_layers(t, *role, source)?;
        }
        if let Some(missing) = want.keys().find(|n| !seen.contains(n.as_str())) {
            return Err(invalid(format!(
                "tensor {missing:?} is missing from the plan"
            )));
        }
        self.config_records_the_plan()?;
        self.output_files_are_plain(&files)?;
        Ok(config)
    }

    /// Checks the other files of the output: plain names, none reserved, none twice, and copies
    /// only of `source_files`.
    fn output_files_are_plain(&self, source_files: &HashSet<&str>) -> Result<(), PlanError> {
        let mut names = HashSet::new();
        for f in &self.files {
            let name = f.name();
            let plain = !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.');
            let reserved = ["config.json", "plan.json", crate::manifest::MANIFEST_NAME];
            if !plain
                || reserved.contains(&name)
                || name.ends_with(".safetensors")
                || !names.insert(name)
            {
                return Err(invalid(format!("output file name {name:?} is not allowed")));
            }
            if let OutputFile::Copy { source, .. } = f {
                if !source_files.contains(source.as_str()) {
                    return Err(invalid(format!(
                        "output file {name:?} copies {source:?}, which is not in source.files"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks that the config the output gets records this plan's layer map, when it records one
    /// (`plan` writes it under `surgery`).
    fn config_records_the_plan(&self) -> Result<(), PlanError> {
        let Some(recorded) = self.config.get("surgery").and_then(|r| r.get("layers")) else {
            return Ok(());
        };
        let show = |l: &Layers| {
            let parts: Vec<String> = l.named().iter().map(|(n, r)| format!("{n} {r}")).collect();
            parts.join(", ")
        };
        match Layers::deserialize(recorded) {
            Ok(layers) if layers == self.layers => Ok(()),
            Ok(layers) => Err(invalid(format!(
                "config.surgery.layers ({}) disagrees with the plan's layers ({})",
                show(&layers),
                show(&self.layers)
            ))),
            Err(e) => Err(invalid(format!("config.surgery.layers: {e}"))),
        }
    }

    /// Checks that tensor `t`, of `role`, reads what the layer map puts there: the block of output
    /// layer j the source layer the map places at j (prelude, core, coda in order), the embedding
    /// and final norm theirs, lm_head the source's or (tied) its embeddings. `source` names the
    /// source's tensors.
    fn reads_its_layers(
        &self,
        t: &TensorSpec,
        role: Role,
        source: Naming,
    ) -> Result<(), PlanError> {
        let name = |r: Role| source.name(r).unwrap_or_default();
        let names = |roles: &[Role]| -> Vec<String> { roles.iter().map(|&r| name(r)).collect() };
        let (options, place) = match role {
            // New, not read: `tensor` checked it has an init and no sources.
            Role::Adapter => return Ok(()),
            Role::Layer(slot, part) => {
                // The shape was checked against the config, so every slot has a layer.
                let Some(layer) = self.layers.output_order().nth(slot) else {
                    return Err(invalid(format!("tensor {:?} has no layer", t.name)));
                };
                let l = &self.layers;
                let (part_name, range) = if slot < l.prelude.len() {
                    ("prelude", l.prelude)
                } else if slot < l.prelude.len() + l.core.len() {
                    ("core", l.core)
                } else {
                    ("coda", l.coda)
                };
                let parts: Vec<Role> = part
                    .parts()
                    .into_iter()
                    .map(|p| Role::Layer(layer, p))
                    .collect();
                (
                    vec![names(&parts)],
                    format!("layers.{part_name} {range} puts source layer {layer} there"),
                )
            }
            Role::LmHead => (
                vec![names(&[Role::LmHead]), names(&[Role::Embed])],
                "lm_head is the source's lm_head or, tied, its embeddings".into(),
            ),
            other => (vec![names(&[other])], format!("it is the source's {other}")),
        };
        let got: Vec<&str> = t.sources.iter().map(|s| s.tensor.as_str()).collect();
        if options.iter().any(|want| *want == got) {
            return Ok(());
        }
        let want = &options[0];
        let (read, instead) = match got.iter().zip(want).find(|(g, w)| *g != w) {
            Some((g, w)) => (g.to_string(), w.clone()),
            None => (got.join(", "), want.join(", ")),
        };
        Err(invalid(format!(
            "tensor {:?} reads {read:?}, but {place} ({instead:?})",
            t.name
        )))
    }
}

fn tensor(t: &TensorSpec, role: Role, files: &HashSet<&str>) -> Result<(), PlanError> {
    let out = t.dtype.0;
    if out.is_quantized() {
        return Err(invalid(format!(
            "tensor {:?}: output dtype {out} is not a float type",
            t.name
        )));
    }
    match (&t.init, t.transform, t.sources.is_empty()) {
        (Some(init), None, true) => {
            if role != Role::Adapter {
                return Err(invalid(format!(
                    "tensor {:?} cannot be initialized: only the adapter is new",
                    t.name
                )));
            }
            if !hf_config::f32_scale(init.scale) {
                return Err(invalid(format!(
                    "tensor {:?}: init scale {} must be finite, >= 0 and at most f32's {:e}",
                    t.name,
                    hf_config::show(init.scale),
                    f32::MAX
                )));
            }
            Ok(())
        }
        (None, Some(transform), false) => sources(t, transform, files),
        _ => Err(invalid(format!(
            "tensor {:?} needs either `init`, or `transform` with `sources`",
            t.name
        ))),
    }
}

fn sources(t: &TensorSpec, transform: Transform, files: &HashSet<&str>) -> Result<(), PlanError> {
    let bad = |msg: String| Err(invalid(format!("tensor {:?}: {msg}", t.name)));
    let mut rows = 0usize;
    for s in &t.sources {
        if !files.contains(s.file.as_str()) {
            return bad(format!("source file {:?} is not in source.files", s.file));
        }
        let n: u64 = s.shape.iter().map(|&d| d as u64).product();
        let size = s.dtype.0.size_of(n);
        let [start, end] = s.byte_range;
        if end < start || size != Some(end - start) {
            return bad(format!(
                "byte range {start}..{end} of {:?} does not hold {:?} {}",
                s.tensor, s.shape, s.dtype.0
            ));
        }
        if s.shape.len() != t.shape.len() || s.shape.get(1..) != t.shape.get(1..) {
            return bad(format!(
                "source {:?} of shape {:?} does not fit",
                s.tensor, s.shape
            ));
        }
        if let Some(heads) = s.unpermute_heads {
            let r = s.shape.first().copied().unwrap_or(0);
            if heads == 0 || r % heads != 0 || (r / heads) % 2 != 0 {
                return bad(format!("cannot un-permute {r} rows as {heads} heads"));
            }
        }
        rows += s.shape.first().copied().unwrap_or(0);
    }
    if t.shape.first() != Some(&rows) {
        return bad(format!(
            "sources have {rows} rows in all, the tensor {:?}",
            t.shape.first()
        ));
    }
    let out = t.dtype.0;
    let same = t
        .sources
        .iter()
        .all(|s| s.dtype.0 == out && s.unpermute_heads.is_none());
    let quantized = t.sources.iter().any(|s| s.dtype.0.is_quantized());
    let ok = match transform {
        Transform::Copy => same && t.sources.len() == 1,
        Transform::ConcatRows => same && t.sources.len() > 1,
        Transform::Convert => !quantized,
        Transform::Dequantize => quantized,
    };
    if !ok {
        return bad(format!("transform {transform:?} does not fit its sources"));
    }
    Ok(())
}
