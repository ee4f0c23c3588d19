"""An OLMo-2-block `huginn_raven` GGUF for checking the patch's olmo2 path against our runtime.

usage: olmo2_fixture.py LLAMA_BLOCKS.gguf OUT.gguf

No OLMo-2 checkpoint is at hand, so this rewrites an f32 `huginn_raven` file with llama blocks
(`surgery export gguf --type f32`) into one with `block_type = olmo2`: the same projections, the
pre-norms dropped, and the OLMo-2 norms (spec section 5.2) taken from the file's own norm weights:
`attn_q_norm` and `post_attention_norm` from `attn_norm`, `attn_k_norm` from the first kv rows of
`attn_norm`, `post_ffw_norm` from `ffn_norm`. The function is no language model, but both runtimes
must compute the same one from it.
"""

import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

src, out = sys.argv[1], sys.argv[2]
reader = GGUFReader(src)
arch = "huginn_raven"
writer = GGUFWriter(out, arch)

for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    value = field.contents()
    if name == f"{arch}.block_type":
        value = "olmo2"
    vtype = field.types[0]
    sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
    writer.add_key_value(name, value, vtype, sub_type=sub)

tensors = {t.name: t for t in reader.tensors}
for t in reader.tensors:
    if t.tensor_type.name != "F32":
        sys.exit(f"olmo2_fixture: {t.name} is {t.tensor_type.name}; give an f32 export")


def data(name):
    t = tensors[name]
    return np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])


for t in reader.tensors:
    name = t.name
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        n, kind = parts[1], parts[2]
        if kind == "attn_norm":
            norm = data(name)
            kv = tensors[f"blk.{n}.attn_k.weight"].shape.tolist()[1]
            writer.add_tensor(f"blk.{n}.attn_q_norm.weight", norm.copy())
            writer.add_tensor(f"blk.{n}.attn_k_norm.weight", norm[:kv].copy())
            writer.add_tensor(f"blk.{n}.post_attention_norm.weight", norm.copy())
            continue
        if kind == "ffn_norm":
            writer.add_tensor(f"blk.{n}.post_ffw_norm.weight", data(name))
            continue
    writer.add_tensor(name, data(name))

writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
