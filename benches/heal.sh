#!/usr/bin/env bash
# Benchmark: `surgery heal` tokens/s on CPU for SmolLM2-135M (4,8,4) at constant m = 4, seq-len 256,
# the GFLOP/s that achieves (forward + backward FLOPs counted from the run's own recurrence draws:
# 6 N per token for every block run with gradient, 2 N for the detached ones, 6 N for lm_head;
# the adapter counted with each core iteration; attention scores left out, small at 256 tokens),
# the machine's f32 matmul GFLOP/s in the same run, and peak resident memory at m = 32 against
# m = 8 with backprop depth 8. Prints Markdown for docs/BENCHMARKS.md.
#
#   benches/heal.sh [WORKDIR]       (needs scripts/fetch-assets.sh to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet
cargo build --release --quiet --example matmul
bin=$PWD/target/release/surgery
model=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -d $work/rec ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/rec" -q >/dev/null
python3 -c "
import json
with open('.cache/assets/kjv.jsonl') as f, open('$work/kjv-part.jsonl', 'w') as out:
    for i, line in zip(range(3000), f): out.write(line)
"
heal() { # OUT M STEPS
    "$bin" heal "$work/rec" --data "$work/kjv-part.jsonl" --out "$work/$1" --force -q --json \
        --seq-len 256 --batch 4 --micro-batch 4 --steps "$3" --curriculum constant \
        --max-mean-recurrence "$2" --backprop-depth 8 --holdout 0 --checkpoint-every 0 >/dev/null
}
mm=$(target/release/examples/matmul 1024 20)
heal m4 4 3
python3 - "$work/m4/metrics.jsonl" "$mm" <<'PY'
import json, sys
layer = 3_540_096            # SmolLM2 parameters per layer
adapter = 2 * 576 * 576      # runs with every core iteration
head = 49152 * 576           # lm_head
lines = [json.loads(l) for l in open(sys.argv[1])][1:]   # the first step warms up
tokens = sum(l["tokens"] for l in lines)
seconds = sum(l["tokens"] / l["tokens_per_second"] for l in lines)
flops = 0
for l in lines:
    per_micro = l["tokens"] / len(l["iterations_with_grad"])
    for w, g in zip(l["iterations_without_grad"], l["iterations_with_grad"]):
        core = 8 * layer + adapter
        flops += per_micro * (6 * 8 * layer + 6 * g * core + 2 * w * core + 6 * head)
print(f"| heal, m = 4 (constant), seq-len 256, batch 4 | {tokens / seconds:.0f} tokens/s | {flops / seconds / 1e9:.1f} GFLOP/s | matmul {float(sys.argv[2]):.1f} GFLOP/s | {flops / seconds / 1e9 / float(sys.argv[2]):.2f} of it |")
PY
for m in 8 32; do
    rss=$(/usr/bin/time -v "$bin" heal "$work/rec" --data "$work/kjv-part.jsonl" --out "$work/rss$m" --force -q \
        --seq-len 256 --batch 1 --steps 1 --curriculum constant --max-mean-recurrence $m --backprop-depth 8 \
        --holdout 0 --checkpoint-every 0 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ {print $2}')
    echo "| peak RSS, m = $m, k = 8, seq-len 256, batch 1 | $((rss / 1024)) MB |"
done
