//! `gguf-rs-dump FILE`: prints what the gguf-rs crate reads from a GGUF file as one JSON object:
//! version, alignment, data offset, every metadata key with its value (arrays whole), and every
//! tensor's name, ggml type id, dimensions (GGUF order), offset and size.

use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: gguf-rs-dump FILE")?;
    let model = gguf_rs::get_gguf_container_array_size(&path, u64::MAX)?.decode()?;
    let tensors: Vec<Value> = model
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "kind": t.kind,
                "dims": t.shape,
                "offset": t.offset,
                "size": t.size,
            })
        })
        .collect();
    let out = json!({
        "version": model.get_version(),
        "alignment": model.alignment(),
        "data_offset": model.data_offset(),
        "metadata": model.metadata(),
        "tensors": tensors,
    });
    println!("{out}");
    Ok(())
}
