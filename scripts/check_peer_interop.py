"""Issue 21, part 6: `surgery` and the paper's own trainer exchange checkpoints both ways. Run by
scripts/check-peer-interop.sh (which installs the peer and builds the binary); prints a table and
exits 1 when a checkpoint does not load with exactly its tensors or a loss differs by more than
1e-5 (relative).

With the binary, from SmolLM2-135M-Instruct's GGUF (scripts/fetch-assets.sh):
  healed   `apply --shape 4,8,4 --state-init zero` (the identity adapter), then `heal` for 3
           steps: a healed SmolLM2 cut in surgery's output layout

Direction 1: the paper's RavenForCausalLM (../shared/peer, transformers 4.51) is built from the
healed folder's config (`RavenConfig.from_pretrained`) and loads its tensors with strict names
(no tensor missing, none left over, none of another shape); its next-token losses at r = 1, 2, 4
equal `surgery eval`'s on the same windows.

Direction 2: the peer's `save_pretrained` (sharded at 100 MB, with the paper's two code files
beside it, as its checkpoints are published) is read back by `surgery eval` (the same losses),
`surgery export gguf` (the exported file's losses too) and `surgery heal` (the same first-step
loss as the same heal of surgery's own healed folder).

Both sides run the zero initial state (the cut's `init_values.std` is 0), so no random draw enters.
"""

import argparse
import json
import pathlib
import shutil
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from raven.raven_config_minimal import RavenConfig
from raven.raven_modeling_minimal_llama import RavenForCausalLM

from surgery_binary import Surgery

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared/peer/raven"
ASSETS = ROOT / ".cache/assets"
RS = (1, 2, 4)
SEQ_LEN = 128
WINDOWS = 4
TOLERANCE = 1e-5


def build(surgery, work):
    """surgery's healed SmolLM2 (4,8,4) cut, and the training and held-out data."""
    lines = (ASSETS / "kjv.jsonl").read_text().splitlines()
    (work / "train.jsonl").write_text("\n".join(lines[:400]) + "\n")
    (work / "held.jsonl").write_text("\n".join(lines[-200:]) + "\n")
    gguf = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = ["--shape", "4,8,4", "--state-init", "zero"]
    surgery("apply", gguf, *cut, "--out", "cut", "-q")
    surgery(*heal_args("cut", "healed"))
    return work / "healed"


def heal_args(model, out):
    """A short heal: 3 steps of 2 x 128 tokens at m = 2, the same data and seed for any input."""
    return [
        "heal", model, "--data", "train.jsonl", "--out", out, "--steps", 3, "--seq-len", SEQ_LEN,
        "--batch", 2, "--max-mean-recurrence", 2, "--checkpoint-every", 0, "--holdout", 0, "-q",
    ]  # fmt: skip


def peer_model(folder):
    """The paper's RavenForCausalLM with `folder`'s config (`RavenConfig.from_pretrained`), its
    tensors (every shard) loaded with strict names: `load_state_dict(strict=True)` raises on a
    tensor missing or left over, which ends the check with its message. (transformers 4.51's own
    `from_pretrained` of a model needs `accelerate`, which the peer's install does not have.)"""
    model = RavenForCausalLM(RavenConfig.from_pretrained(folder)).float().eval()
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model


def windows(folder, data, eos):
    """surgery eval's windows: every document encoded as the tokenizer does, then EOS, in one
    stream; WINDOWS windows of SEQ_LEN inputs, the next tokens their targets."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stream = []
    for line in data.read_text().splitlines():
        stream += tokenizer.encode(json.loads(line)["text"]).ids + [eos]
        if len(stream) > WINDOWS * SEQ_LEN:
            break
    starts = range(0, WINDOWS * SEQ_LEN, SEQ_LEN)
    return [(stream[a : a + SEQ_LEN], stream[a + 1 : a + SEQ_LEN + 1]) for a in starts]


def peer_losses(model, wins):
    """Mean next-token loss at each r over the windows, one batch, all r iterations without
    gradient (the peer's `num_steps`)."""
    ids = torch.tensor([inputs for inputs, _ in wins])
    targets = torch.tensor([after for _, after in wins])
    losses = {}
    with torch.no_grad():
        for r in RS:
            logits = model(ids, num_steps=r).logits.double()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            )
            losses[r] = nll.item()
    return losses


def surgery_losses(surgery, model, data):
    out = surgery(
        "eval", model, "--data", data, "--recurrence", ",".join(map(str, RS)),
        "--seq-len", SEQ_LEN, "--max-tokens", WINDOWS * SEQ_LEN, "--json", "-q",
    )  # fmt: skip
    rows = json.loads(out)["rows"]
    if any(row["tokens"] != WINDOWS * SEQ_LEN for row in rows):
        sys.exit(f"surgery eval {model}: not {WINDOWS * SEQ_LEN} tokens scored: {rows}")
    return {row["r"]: row["loss"] for row in rows}


def saved_by_peer(model, folder):
    """The peer's save_pretrained, sharded, with the paper's code files beside it."""
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100MB")
    for name in ("raven_modeling_minimal_llama.py", "raven_config_minimal.py"):
        shutil.copy(PEER / name, folder / name)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--surgery", required=True, type=pathlib.Path, help="the binary")
    parser.add_argument("--work", required=True, type=pathlib.Path, help="an empty folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = args.work.resolve()
    surgery = Surgery(args.surgery.resolve(), work)
    healed = build(surgery, work)
    data = work / "held.jsonl"
    eos = json.loads((healed / "config.json").read_text())["eos_token_id"]
    wins = windows(healed, data, eos[0] if isinstance(eos, list) else eos)

    peer = peer_model(healed)
    back = saved_by_peer(peer, work / "peer-saved")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (healed / name).exists():
            shutil.copy(healed / name, back / name)
    shards = sorted(p.name for p in back.glob("*.safetensors"))
    surgery("export", "gguf", back, "--type", "f32", "--out", "peer-saved.gguf", "-q")
    surgery(*heal_args(back, "healed-again"))
    surgery(*heal_args(healed, "healed-twice"))

    theirs = peer_losses(peer, wins)
    rows = [
        ("peer loads surgery's heal", surgery_losses(surgery, healed, data), theirs),
        ("surgery reads the peer's save", surgery_losses(surgery, back, data), theirs),
        ("... exported to GGUF f32", surgery_losses(surgery, "peer-saved.gguf", data), theirs),
    ]
    print(f"torch {torch.__version__}; the peer's save_pretrained wrote {', '.join(shards)}")
    print("{:<31} {:>2} {:>14} {:>14} {:>10}".format("direction", "r", "surgery", "peer", "rel. diff"))
    worst = 0.0
    for name, ours, peers in rows:
        for r in RS:
            diff = abs(ours[r] - peers[r]) / abs(peers[r])
            worst = max(worst, diff)
            print(f"{name:<31} {r:>2} {ours[r]:>14.8f} {peers[r]:>14.8f} {diff:>10.1e}")
    first = [json.loads((work / d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for d in ("healed-again", "healed-twice")]  # fmt: skip
    heal_diff = abs(first[0] - first[1]) / abs(first[1])
    print(f"heal of the peer's save: first-step loss {first[0]:.8f}, of surgery's own folder "
          f"{first[1]:.8f} (rel. diff {heal_diff:.1e})")
    worst = max(worst, heal_diff)
    verdict = "within" if worst <= TOLERANCE else "NOT within"
    print(f"largest relative difference {worst:.1e}: {verdict} {TOLERANCE:.0e}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
