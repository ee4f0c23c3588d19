"""Golden logits of tiny random Qwen2 and Qwen3 models from Hugging Face transformers itself.

Run from the repository root:

    ~/.cache/surgery-transformers-venv/bin/python scripts/golden_families.py

(the venv scripts/check-transformers.sh makes: torch and transformers 5.23). Writes
tests/golden/tiny-qwen2/ and tests/golden/tiny-qwen3/, each with config.json, model.safetensors
and golden_hf_logits.safetensors (`input_ids` I64 [2, 24], `logits` F32 [2, 24, 256]), the
layout of tests/golden/tiny-llama/. Deterministic: fixed seeds, float32 on the CPU.

Every weight is drawn N(0, 0.2) (norm weights 1 + N(0, 0.2), biases N(0, 0.2)), so the biases are
far from 0 and the q/k norm weights far from 1: a runtime that skips either cannot match.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

SHAPE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=160,
    vocab_size=256,
    num_hidden_layers=6,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)


def perturbed(model, seed):
    """Every parameter redrawn: norms around 1, everything else around 0, none exactly 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def write(folder, model):
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    save_file(
        {"input_ids": ids, "logits": logits},
        os.path.join(folder, "golden_hf_logits.safetensors"),
    )
    gen = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    print(folder, config.get("model_type"), "logits", tuple(logits.shape), file=sys.stderr)


def main():
    torch.manual_seed(0)
    qwen2 = Qwen2Config(
        **SHAPE,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    write("tests/golden/tiny-qwen2", perturbed(Qwen2ForCausalLM(qwen2).eval(), 2))
    qwen3 = Qwen3Config(
        **SHAPE,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    write("tests/golden/tiny-qwen3", perturbed(Qwen3ForCausalLM(qwen3).eval(), 3))


if __name__ == "__main__":
    main()
