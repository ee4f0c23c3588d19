#!/usr/bin/env bash
# Side by side in one run: `surgery heal` / `surgery eval` against the paper's own PyTorch model
# (../shared/peer, installed by benches/peer-setup.sh) on the same work, SmolLM2-135M's shapes cut
# (4,8,4), THREADS threads each (default 2), and both libraries' f32 matmul rate. Prints Markdown
# rows with the ratios for docs/BENCHMARKS.md.
#
#   benches/heal-vs-peer.sh [WORKDIR]      (needs scripts/fetch-assets.sh to have run)
#
# Work, as perf_peer.py defines it: training steps of batch 2 x 256 tokens, AdamW, the core run
# 1 time without and 4 times with gradient (ours: --sampler fixed --curriculum constant
# --max-mean-recurrence 5 --backprop-depth 4), the first step a warm-up; forward of 512 tokens,
# batch 1, at r = 1 and 4; peak RSS of a training step at batch 4 x 256 with k = 8 (m = 8, and
# m = 32 for ours). Our weights are SmolLM2's (dequantized), the peer's random: the FLOPs are the
# same.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
threads=${THREADS:-2}
mkdir -p "$work"
benches/peer-setup.sh
cargo build --release --quiet
cargo build --release --quiet --example matmul
bin=$PWD/target/release/surgery
peer() { PYTHONPATH=.cache/peer-T:../shared/peer .cache/peer-venv/bin/python "$@"; }
rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ {print int($2 / 1024)}'; }
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $threads threads; $(date -u +%F)"
model=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -d $work/rec ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/rec" -q >/dev/null
head -n 3000 .cache/assets/kjv.jsonl >"$work/kjv-part.jsonl"

# The peer: forward and training throughput (perf_peer.py), its peak RSS at batch 4 x 256, k = 8,
# and PyTorch's matmul rate.
peer ../shared/peer/perf_peer.py "$threads" >"$work/peer.json"
peer benches/peer_train.py "$threads" 4 256 0 8 >"$work/peer-rss.json"
peer -c "
import time, torch
torch.set_num_threads($threads)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
a @ b
t = time.perf_counter()
for _ in range(20): a @ b
print(20 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9)" >"$work/peer-matmul"

# Ours on the same work.
heal() { # NAME OPTIMIZER STEPS BATCH M K [COMMAND TO RUN IT UNDER...]
    local name=$1 optimizer=$2 steps=$3 batch=$4 m=$5 k=$6
    shift 6
    "$@" "$bin" heal "$work/rec" --data "$work/kjv-part.jsonl" --out "$work/$name" --force -q --json \
        --threads "$threads" --seq-len 256 --batch "$batch" --micro-batch "$batch" --steps "$steps" \
        --sampler fixed --curriculum constant --max-mean-recurrence "$m" --backprop-depth "$k" \
        --optimizer "$optimizer" --holdout 0 --checkpoint-every 0
}
heal adamw adamw 4 2 5 4 >/dev/null
heal muon muon 4 2 5 4 >/dev/null
rss8=$(heal rss8 adamw 1 4 8 8 rss)
rss32=$(heal rss32 adamw 1 4 32 8 rss)
RAYON_NUM_THREADS=$threads "$bin" eval "$work/rec" --data .cache/assets/xsum-test.jsonl --field document \
    --recurrence 1,4 --seq-len 512 --max-tokens 1536 --batch 1 --threads "$threads" --json -q >"$work/eval.json"
mm=$(RAYON_NUM_THREADS=$threads target/release/examples/matmul 1024 20)

python3 - "$work" "$mm" "$rss8" "$rss32" <<'PY'
import json, sys
work, mm, rss8, rss32 = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
peer = json.load(open(f"{work}/peer.json"))
peer_rss = json.load(open(f"{work}/peer-rss.json"))
peer_mm = float(open(f"{work}/peer-matmul").read())
layer, adapter, head = 3_540_096, 2 * 576 * 576, 49152 * 576
core = 8 * layer + adapter
flops_tok = 6 * 8 * layer + 4 * 6 * core + 1 * 2 * core + 6 * head   # perf_peer.py's count
def heal_tok_s(name):
    lines = [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl")][1:]   # step 0 warms up
    return sum(l["tokens"] for l in lines) / sum(l["tokens"] / l["tokens_per_second"] for l in lines)
ours_eval = {row["r"]: row["tokens_per_second"] for row in json.load(open(f"{work}/eval.json"))["rows"]}
rows = [
    ("heal tokens/s, AdamW (b 2 x 256, 1 + 4 iterations)", peer["train_tok_s_seq256_b2_n1_k4"], heal_tok_s("adamw"), True),
    ("heal GFLOP/s, AdamW (same FLOP count)", peer["train_gflops"], heal_tok_s("adamw") * flops_tok / 1e9, True),
    ("heal tokens/s, Muon (ours) vs AdamW (peer)", peer["train_tok_s_seq256_b2_n1_k4"], heal_tok_s("muon"), True),
    ("eval / forward tokens/s, r = 1 (512 tokens, batch 1)", peer["forward_tok_s_r1"], ours_eval[1], True),
    ("eval / forward tokens/s, r = 4", peer["forward_tok_s_r4"], ours_eval[4], True),
    ("heal peak RSS MB, b 4 x 256, k = 8, m = 8", peer_rss["peak_rss_mb"], rss8, False),
    ("heal peak RSS MB, b 4 x 256, k = 8, m = 32 (ours) vs m = 8 (peer)", peer_rss["peak_rss_mb"], rss32, False),
    ("f32 matmul 1024^3 GFLOP/s (PyTorch / candle)", peer_mm, mm, True),
]
print(f"| | peer ({peer['peer']}) | surgery | surgery / peer |")
print("|---|---:|---:|---:|")
for name, p, o, _ in rows:
    print(f"| {name} | {p:.1f} | {o:.1f} | {o / p:.2f}x |")
print(f"\nheal GFLOP/s as a share of each library's matmul rate: peer {peer['train_gflops'] / peer_mm:.2f}, "
      f"surgery {heal_tok_s('adamw') * flops_tok / 1e9 / mm:.2f}; m = 32 RSS / m = 8 RSS (ours): {rss32 / rss8:.2f}")
PY
