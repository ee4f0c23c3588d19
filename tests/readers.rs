//! Every kind of source checkpoint reads back to the same canonical tensors: safetensors (single,
//! sharded; F32/F16/BF16), GGUF (Q/K rows un-permuted, every supported type), the published
//! recurrent layout; and the golden models made with Hugging Face transformers.

mod common;

use std::path::Path;

use surgery::arch::Role;
use surgery::dtype::DType;
use surgery::formats::gguf;
use surgery::formats::hf_config::Family;
use surgery::source::SourceModel;
use surgery::synth::{self, SynthSpec};

fn all_f32(model: &SourceModel) -> Vec<(Role, Vec<f32>)> {
    model
        .tensors
        .iter()
        .map(|(&role, t)| (role, model.read_f32(t).expect("readable")))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn safetensors_in_every_layout_reads_the_generated_values() {
    let dir = tempfile::tempdir().unwrap();
    for (i, spec) in [
        SynthSpec::llama(4),
        SynthSpec {
            tied: true,
            shards: 3,
            ..SynthSpec::llama(3)
        },
        SynthSpec {
            dtype: DType::BF16,
            ..SynthSpec::olmo2(2)
        },
        SynthSpec {
            dtype: DType::F16,
            llama3_rope: true,
            shards: 2,
            ..SynthSpec::llama(5)
        },
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("m{i}"));
        synth::write_hf(&path, &spec, 7).unwrap();
        let model = SourceModel::open(&path).unwrap();
        assert_eq!(model.config, spec.config());
        let want = spec.tensors(7);
        assert_eq!(model.tensors.len(), want.len(), "{spec:?}");
        for (role, shape, values) in want {
            let t = model.tensor(role).unwrap();
            assert_eq!(t.shape, shape);
            assert_eq!(t.dtype, spec.dtype);
            // The bytes are exactly what the fixture encoded.
            assert_eq!(
                model.bytes(t),
                &spec.dtype.encode_f32(&values).unwrap()[..],
                "{role}"
            );
        }
        let expected_files = 1 + spec.shards + usize::from(spec.shards > 1);
        assert_eq!(model.files.len(), expected_files);
    }
}

#[test]
fn gguf_unpermutes_q_and_k_back_to_the_hugging_face_layout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::llama(3);
    synth::write_hf(&dir.path().join("hf"), &spec, 11).unwrap();
    let hf = SourceModel::open(&dir.path().join("hf")).unwrap();
    for dtype in [DType::F32, DType::F16] {
        let path = dir.path().join(format!("m-{dtype}.gguf"));
        synth::write_gguf(&path, &spec, 11, dtype).unwrap();
        let g = SourceModel::open(&path).unwrap();
        assert_eq!(g.config.n_layers, 3);
        assert_eq!(
            g.tensor(Role::Layer(0, surgery::arch::LayerRole::Q))
                .unwrap()
                .unpermute_heads,
            Some(4)
        );
        assert_eq!(
            g.tensor(Role::Layer(0, surgery::arch::LayerRole::K))
                .unwrap()
                .unpermute_heads,
            Some(2)
        );
        for ((role, a), (role_b, b)) in all_f32(&hf).into_iter().zip(all_f32(&g)) {
            assert_eq!(role, role_b);
            // Norms stay F32 in GGUF, as llama.cpp's converter stores them.
            let matrix = hf.tensor(role).unwrap().shape.len() == 2;
            let a = if dtype == DType::F16 && matrix {
                a.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect()
            } else {
                a
            };
            assert_eq!(bits(&a), bits(&b), "{role} as {dtype}");
        }
    }
}

#[test]
fn gguf_of_every_quantized_type_reads_back_as_its_own_dequantization() {
    let dir = tempfile::tempdir().unwrap();
    // Rows of 256 so the K-quants apply to every matrix.
    let spec = SynthSpec {
        hidden: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn: 512,
        tied: true,
        ..SynthSpec::llama(2)
    };
    let want = spec.tensors(3);
    for dtype in DType::ALL
        .into_iter()
        .filter(|d| d.is_quantized() || *d == DType::BF16)
    {
        let path = dir.path().join(format!("m-{dtype}.gguf"));
        synth::write_gguf(&path, &spec, 3, dtype).unwrap();
        let g = SourceModel::open(&path).unwrap();
        assert!(g.config.tied);
        for (role, shape, values) in &want {
            let t = g.tensor(*role).unwrap();
            let expected = if shape.len() == 2 {
                assert_eq!(t.dtype, dtype, "{role}");
                let q = gguf::quantize(dtype, values).unwrap();
                gguf::dequantize(dtype, &q, values.len()).unwrap()
            } else {
                values.clone()
            };
            assert_eq!(
                bits(&g.read_f32(t).unwrap()),
                bits(&expected),
                "{role} as {dtype}"
            );
        }
    }
}

/// The golden models in tests/golden (copied from ../shared/golden), made with Hugging Face
/// transformers and the paper's code.
fn golden(name: &str) -> Option<std::path::PathBuf> {
    let path = common::root().join("tests/golden").join(name);
    if path.is_dir() {
        Some(path)
    } else {
        eprintln!("NOTICE: skipping: {} is missing", path.display());
        None
    }
}

#[test]
fn reads_the_golden_source_and_recurrent_models() {
    let Some(tiny) = golden("tiny-llama3-tied") else {
        return;
    };
    let m = SourceModel::open(&tiny).unwrap();
    assert_eq!(
        (m.config.n_layers, m.config.hidden, m.config.n_kv_heads),
        (6, 64, 2)
    );
    assert!(m.config.tied && m.config.rope_scaling.is_some());
    assert!(m.tensor(Role::LmHead).is_none());

    for (name, (p, c, k)) in [
        ("tiny-llama-recurrent-1-2-1", (1, 2, 1)),
        ("tiny-llama3-tied-recurrent-2-2-2", (2, 2, 2)),
    ] {
        let Some(dir) = golden(name) else { return };
        let m = SourceModel::open(&dir).unwrap();
        let s = m.config.recurrent.unwrap();
        assert_eq!(
            (s.prelude, s.core, s.coda, s.adapter),
            (p, c, k, true),
            "{name}"
        );
        assert_eq!(m.config.family, Family::Llama);
        assert_eq!(m.tensor(Role::Adapter).unwrap().shape, vec![64, 128]);
        assert_eq!(
            m.tensor(Role::Layer(p, surgery::arch::LayerRole::Qkv))
                .unwrap()
                .name,
            "transformer.core_block.0.attn.Wqkv.weight"
        );
    }
}

#[test]
fn smollm2_gguf_reads_as_llama_with_its_published_sizes() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let m = SourceModel::open(Path::new(&path)).unwrap();
    let c = &m.config;
    assert_eq!(
        (
            c.n_layers,
            c.hidden,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn,
            c.vocab
        ),
        (30, 576, 9, 3, 64, 1536, 49152)
    );
    assert!(c.tied);
    assert_eq!((c.rope_theta, c.norm_eps), (100000.0, 1e-5));
    assert_eq!(m.tensor(Role::Embed).unwrap().dtype, DType::Q8_0);
    // Dequantization is finite and un-permutation preserves the multiset of each head's rows.
    let q = m
        .tensor(Role::Layer(0, surgery::arch::LayerRole::Q))
        .unwrap();
    let values = m.read_f32(q).unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    let raw = gguf::dequantize(q.dtype, m.bytes(q), q.n_elements()).unwrap();
    let row = |v: &[f32], r: usize| bits(&v[r * 576..(r + 1) * 576]);
    // HF row h*64 + t*32 + j is GGUF row h*64 + 2j + t.
    for (h, t, j) in [(0, 0, 0), (0, 1, 0), (3, 1, 17), (8, 0, 31)] {
        assert_eq!(
            row(&values, h * 64 + t * 32 + j),
            row(&raw, h * 64 + 2 * j + t)
        );
    }
}
