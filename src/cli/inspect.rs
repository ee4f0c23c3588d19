//! `surgery inspect MODEL`: what a checkpoint is, without loading its weights.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};

use surgery::arch::Role;
use surgery::plan::cost;
use surgery::source::SourceModel;

use super::{si, thousands, Global};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A Hugging Face directory, a .safetensors file with config.json beside it, or a .gguf file.
    pub model: PathBuf,
}

pub fn run(args: InspectArgs, global: Global) -> anyhow::Result<()> {
    let model = SourceModel::open(&args.model)?;
    let report = report(&model)?;
    if global.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_table(&report)?;
    }
    Ok(())
}

/// Largest |W - [0 | I]| of the adapter: 0 means the model computes exactly its pruned source.
fn adapter_distance_from_identity(model: &SourceModel) -> anyhow::Result<Option<f64>> {
    let Some(t) = model.tensor(Role::Adapter) else {
        return Ok(None);
    };
    let h = model.config.hidden;
    let w = model
        .read_f32(t)
        .with_context(|| format!("reading {}", t.name))?;
    let max = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (row, col) = (i / (2 * h), i % (2 * h));
            let target = if col == h + row { 1.0 } else { 0.0 };
            (v as f64 - target).abs()
        })
        .fold(0.0, f64::max);
    Ok(Some(max))
}

fn report(model: &SourceModel) -> anyhow::Result<Value> {
    let c = &model.config;
    let dtypes: Vec<Value> = model
        .dtype_histogram()
        .into_iter()
        .map(|(d, (tensors, elements))| json!({"dtype": d.name(), "tensors": tensors, "elements": elements}))
        .collect();
    let per_layer = cost::layer_params(c);
    let embeddings = cost::embedding_params(c);
    let (total, embedding_total) = match c.recurrent {
        Some(s) => {
            let shape = surgery::plan::Shape {
                prelude: s.prelude,
                core: s.core,
                coda: s.coda,
            };
            (cost::recurrent_params(c, shape, s.adapter), 2 * embeddings)
        }
        None => (
            cost::source_params(c),
            if c.tied { 1 } else { 2 } * embeddings,
        ),
    };
    let recurrent = match c.recurrent {
        Some(s) => json!({
            "prelude": s.prelude,
            "core": s.core,
            "coda": s.coda,
            "mean_recurrence": s.mean_recurrence,
            "mean_backprop_depth": s.mean_backprop_depth,
            "adapter": s.adapter.then(|| cost::adapter_params(c)),
            "adapter_max_abs_from_identity": adapter_distance_from_identity(model)?,
        }),
        None => Value::Null,
    };
    Ok(json!({
        "path": model.path.display().to_string(),
        "format": model.format,
        "family": c.family,
        "recurrent": recurrent,
        "layers": c.n_layers,
        "hidden": c.hidden,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "ffn": c.ffn,
        "vocab": c.vocab,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tied_embeddings": c.tied,
        "norm_eps": c.norm_eps,
        "max_position": c.max_position,
        "dtypes": dtypes,
        "params": {
            "total": total,
            "embeddings": embedding_total,
            "per_layer": per_layer,
        },
        "files": model.files,
        "bytes": model.total_bytes(),
        "tokenizer": model.tokenizer,
    }))
}

fn print_table(r: &Value) -> anyhow::Result<()> {
    let s = |k: &str| match &r[k] {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let rows: Vec<(&str, String)> = vec![
        ("model", s("path")),
        (
            "format",
            format!(
                "{}, {} file(s), {}",
                s("format"),
                r["files"].as_array().map_or(0, Vec::len),
                si(n(&r["bytes"]) as f64, "B")
            ),
        ),
        ("family", s("family")),
        ("layers", s("layers")),
        ("hidden", s("hidden")),
        (
            "heads",
            format!(
                "{} ({} key-value heads, head_dim {})",
                s("heads"),
                s("kv_heads"),
                s("head_dim")
            ),
        ),
        ("ffn", s("ffn")),
        ("vocabulary", s("vocab")),
        (
            "rope",
            match &r["rope_scaling"] {
                Value::Null => format!("theta {}, no scaling", s("rope_theta")),
                sc => format!("theta {}, llama3 scaling {sc}", s("rope_theta")),
            },
        ),
        (
            "embeddings",
            if r["tied_embeddings"] == true {
                "tied"
            } else {
                "untied"
            }
            .into(),
        ),
        ("norm eps", s("norm_eps")),
        ("dtypes", dtypes(&r["dtypes"])),
        (
            "parameters",
            format!(
                "{} total: embeddings {}, per layer {}",
                thousands(n(&r["params"]["total"])),
                thousands(n(&r["params"]["embeddings"])),
                thousands(n(&r["params"]["per_layer"]))
            ),
        ),
        (
            "tokenizer",
            match &r["tokenizer"] {
                Value::Null => "none".into(),
                t => match t["vocab"].as_u64() {
                    Some(v) => format!("{}, {v} tokens", t["kind"].as_str().unwrap_or("?")),
                    None => t["kind"].as_str().unwrap_or("?").to_string(),
                },
            },
        ),
    ];
    for (k, v) in rows {
        outln!("{k:<11} {v}")?;
    }
    print_recurrent(&r["recurrent"])
}

/// "BF16 (272 tensors, 134.52 M elements), ..."
fn dtypes(list: &Value) -> String {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            format!(
                "{} ({} tensors, {} elements)",
                d["dtype"].as_str().unwrap_or("?"),
                d["tensors"],
                si(d["elements"].as_u64().unwrap_or(0) as f64, "")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A recurrent model's shape and adapter (nothing for a static one).
fn print_recurrent(rec: &Value) -> anyhow::Result<()> {
    if rec.is_null() {
        return Ok(());
    }
    outln!(
        "{:<11} ({},{},{}) prelude, core, coda; mean recurrence {}, backprop depth {}",
        "recurrent",
        rec["prelude"],
        rec["core"],
        rec["coda"],
        rec["mean_recurrence"],
        rec["mean_backprop_depth"]
    )?;
    let adapter = match rec["adapter_max_abs_from_identity"].as_f64() {
        None => "none (injection: none)".to_string(),
        Some(0.0) => "linear 2h -> h, exactly [0 | I] (computes the pruned model)".into(),
        Some(d) => format!("linear 2h -> h, max |W - [0 | I]| = {d:.3e}"),
    };
    outln!("{:<11} {adapter}", "adapter")?;
    Ok(())
}
