"""Issue 20's check: surgery's recurrent outputs load in Hugging Face transformers and score the
same tokens as `surgery eval`. Run by scripts/check-transformers.sh (which makes the venv and
builds the binary); it prints a table and exits 1 when a loss differs by more than 1e-5
(relative) or a checkpoint does not load with exactly its tensors.

From the tiny fixture (fixtures/tiny/) it builds, with the binary:
  apply          `apply --shape 1,2,1`: identity adapter, initial state drawn from N(0, std)
  healed         `apply --adapter-init reference --state-init zero`, then `heal` for 20 steps
  healed-gguf    the healed model through `export gguf --type f32` and `export safetensors`
  no-adapter     `apply --injection none`: the core applied r times to the prelude's output
  olmo2          the fixture's weights as OLMo-2 blocks (post-norms, q/k norms; no language
                 model, but both runtimes must compute the same function), reference adapter
  llama3-rope    the fixture with Llama-3 RoPE scaling, reference adapter
  qwen2          the fixture's weights as Qwen2 blocks (random q/k/v biases added, embeddings
                 tied), reference adapter
  qwen3          the fixture's weights as Qwen3 blocks (random per-head q/k norms added),
                 reference adapter

Each is loaded with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and scored
at r = 1, 2, 4 on the same windows `surgery eval` reads (the held-out chapters as JSONL, windows
of 128 tokens, 1,000 targets; the last window shorter, so padding and its mask are exercised).
Exact comparison needs the same initial state on both sides: the zero state, or any state under
an identity adapter (which ignores it); surgery eval's seeded draws are not torch's.
"""

import argparse
import json
import pathlib
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from surgery_binary import Surgery

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures/tiny/model"
TEXT = ROOT / "fixtures/tiny/text"
FILES = ("configuration_huginn_raven.py", "modeling_huginn_raven.py")
RS = (1, 2, 4)
SEQ_LEN = 128
MAX_TOKENS = 1000
TOLERANCE = 1e-5


def variant_source(work, name, edit_config, edit_tensors):
    """A copy of the fixture with its config and tensors edited: `work/name`."""
    out = work / name
    out.mkdir()
    config = json.loads((TINY / "config.json").read_text())
    edit_config(config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(TINY / "model.safetensors")
    save_file(edit_tensors(tensors), out / "model.safetensors")
    (out / "tokenizer.json").write_bytes((TINY / "tokenizer.json").read_bytes())
    return out


def as_olmo2(config):
    config.update(model_type="olmo2", architectures=["Olmo2ForCausalLM"])


def olmo2_tensors(tensors):
    """Llama's norms moved to OLMo-2's places, and q/k norms added: norms of random scale, so
    that a norm applied to the wrong tensor shows."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in tensors.items():
        if name.endswith("input_layernorm.weight"):
            prefix = name.removesuffix("input_layernorm.weight")
            q = tensors[prefix + "self_attn.q_proj.weight"].shape[0]
            kv = tensors[prefix + "self_attn.k_proj.weight"].shape[0]
            for norm, width in [("self_attn.q_norm", q), ("self_attn.k_norm", kv)]:
                scale = 1 + 0.3 * torch.randn(width, generator=g)
                out[f"{prefix}{norm}.weight"] = scale.to(t.dtype)
            out[prefix + "post_attention_layernorm.weight"] = t
        elif name.endswith("post_attention_layernorm.weight"):
            prefix = name.removesuffix("post_attention_layernorm.weight")
            out[prefix + "post_feedforward_layernorm.weight"] = t
        else:
            out[name] = t
    return out


def as_qwen2(config):
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True)


def qwen2_tensors(tensors):
    """Random q/k/v biases added (a bias added to the wrong rows shows), lm_head dropped (tied)."""
    g = torch.Generator().manual_seed(1)
    out = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    for name, t in tensors.items():
        for proj in ("q_proj", "k_proj", "v_proj"):
            if name.endswith(f"self_attn.{proj}.weight"):
                bias = 0.5 * torch.randn(t.shape[0], generator=g)
                out[name.removesuffix("weight") + "bias"] = bias.to(t.dtype)
    return out


def as_qwen3(config):
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False)


def qwen3_tensors(tensors):
    """Per-head q/k norms added ([head_dim] each), of random scale."""
    g = torch.Generator().manual_seed(2)
    config = json.loads((TINY / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    out = dict(tensors)
    for name, t in tensors.items():
        if name.endswith("input_layernorm.weight"):
            prefix = name.removesuffix("input_layernorm.weight")
            for norm in ("self_attn.q_norm", "self_attn.k_norm"):
                scale = 1 + 0.3 * torch.randn(head_dim, generator=g)
                out[f"{prefix}{norm}.weight"] = scale.to(t.dtype)
    return out


def with_llama3_rope(config):
    # A short original context, so that all three bands of the rule (kept, interpolated,
    # divided by the factor) hold some of head_dim 32's frequencies.
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


def build(surgery, work):
    """The checkpoints to check: (name, folder)."""
    shape = ["--shape", "1,2,1", "-q"]
    reference = ["--adapter-init", "reference", "--state-init", "zero"]
    surgery("apply", TINY, *shape, "--out", "apply")
    surgery("apply", TINY, *shape, *reference, "--out", "cut")
    train = work / "train.txt"
    chapters = (TEXT / "train.txt").read_text().split("\n\n")
    train.write_text("\n\n".join(chapters[:300]))
    surgery(
        "heal", "cut", "--data", train, "--out", "healed", "--steps", 20, "--seq-len", SEQ_LEN,
        "--batch", 4, "--max-mean-recurrence", 4, "--checkpoint-every", 0, "-q",
    )  # fmt: skip
    surgery("export", "gguf", "healed", "--type", "f32", "--out", "healed.gguf", "-q")
    surgery("export", "safetensors", "healed.gguf", "--out", "healed-gguf", "-q")
    surgery("apply", TINY, *shape, "--injection", "none", "--out", "no-adapter")
    olmo2 = variant_source(work, "olmo2-source", as_olmo2, olmo2_tensors)
    surgery("apply", olmo2, *shape, *reference, "--out", "olmo2")
    rope = variant_source(work, "llama3-source", with_llama3_rope, lambda t: t)
    surgery("apply", rope, *shape, *reference, "--out", "llama3-rope")
    qwen2 = variant_source(work, "qwen2-source", as_qwen2, qwen2_tensors)
    surgery("apply", qwen2, *shape, *reference, "--out", "qwen2")
    qwen3 = variant_source(work, "qwen3-source", as_qwen3, qwen3_tensors)
    surgery("apply", qwen3, *shape, *reference, "--out", "qwen3")
    names = ["apply", "healed", "healed-gguf", "no-adapter", "olmo2", "llama3-rope"]
    names += ["qwen2", "qwen3"]
    return [(name, work / name) for name in names]


def held_out(work):
    """The first held-out chapters as JSONL (each line one document, exactly as read)."""
    chapters = [c for c in (TEXT / "heldout.txt").read_text().split("\n\n") if c.strip()]
    path = work / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chapters[:12]))
    return path


def windows(folder, data, eos):
    """surgery eval's windows: every document encoded as the tokenizer does, then EOS, in one
    stream; windows of SEQ_LEN inputs, the next tokens their targets, MAX_TOKENS targets in all."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stream = []
    for line in data.read_text().splitlines():
        stream += tokenizer.encode(json.loads(line)["text"]).ids + [eos]
    n = min(MAX_TOKENS, len(stream) - 1)
    ends = [(a, min(a + SEQ_LEN, n)) for a in range(0, n, SEQ_LEN)]
    return [(stream[a:end], stream[a + 1 : end + 1]) for a, end in ends]


def load(folder):
    """The checkpoint through transformers' Auto class, from its own files; refused unless every
    tensor is read and none is left over."""
    for name in FILES:
        if (folder / name).read_bytes() != (ROOT / "integrations/transformers" / name).read_bytes():
            sys.exit(f"{folder / name} is not integrations/transformers/{name}")
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        sys.exit(f"{folder}: loading info {info}")
    if type(model).__name__ != "RavenForCausalLM" or not type(model).__module__.startswith(
        "transformers_modules."
    ):
        sys.exit(f"{folder}: loaded {type(model)}, not the checkpoint's own RavenForCausalLM")
    return model.eval()


def transformers_losses(model, wins):
    """Mean next-token loss at each r, all windows in one right-padded batch with its mask."""
    t = max(len(inputs) for inputs, _ in wins)
    ids = torch.zeros(len(wins), t, dtype=torch.long)
    targets, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (inputs, after) in enumerate(wins):
        ids[i, : len(inputs)] = torch.tensor(inputs)
        targets[i, : len(after)] = torch.tensor(after)
        mask[i, : len(inputs)] = 1
    losses = {}
    with torch.no_grad():
        for r in RS:
            logits = model(ids, attention_mask=mask, num_steps=r).logits.double()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            losses[r] = ((nll * mask.reshape(-1)).sum() / mask.sum()).item(), int(mask.sum())
    return losses


def surgery_losses(surgery, folder, data):
    out = surgery(
        "eval", folder, "--data", data, "--recurrence", ",".join(map(str, RS)),
        "--seq-len", SEQ_LEN, "--max-tokens", MAX_TOKENS, "--json", "-q",
    )  # fmt: skip
    return {row["r"]: (row["loss"], row["tokens"]) for row in json.loads(out)["rows"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--surgery", required=True, type=pathlib.Path, help="the binary")
    parser.add_argument("--work", required=True, type=pathlib.Path, help="an empty folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    transformers.logging.disable_progress_bar()
    surgery = Surgery(args.surgery.resolve(), args.work)
    checkpoints = build(surgery, args.work)
    data = held_out(args.work)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    head = ("checkpoint", "r", "surgery eval", "transformers", "rel. diff", "tokens")
    print("{:<12} {:>2} {:>14} {:>14} {:>10} {:>6}".format(*head))
    worst = 0.0
    for name, folder in checkpoints:
        model = load(folder)
        eos = model.config.eos_token_id
        wins = windows(folder, data, eos[0] if isinstance(eos, list) else eos)
        ours, theirs = surgery_losses(surgery, folder, data), transformers_losses(model, wins)
        for r in RS:
            (a, n_ours), (b, n_theirs) = ours[r], theirs[r]
            if n_ours != n_theirs:
                sys.exit(f"{name}: surgery scored {n_ours} tokens, transformers {n_theirs}")
            diff = abs(a - b) / abs(a)
            worst = max(worst, diff)
            print(f"{name:<12} {r:>2} {a:>14.8f} {b:>14.8f} {diff:>10.1e} {n_ours:>6}")
    verdict = "within" if worst <= TOLERANCE else "NOT within"
    print(f"largest relative difference {worst:.1e}: {verdict} {TOLERANCE:.0e}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
