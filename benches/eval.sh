#!/usr/bin/env bash
# Benchmark: `surgery eval` tokens/s on SmolLM2-135M (4,8,4) at r = 1 and r = 4 with 1 and 2
# threads, the GFLOP/s that achieves (forward FLOPs per token from the plan's cost model), and the
# same machine's f32 matmul GFLOP/s through the same kernels, measured in the same run for scale.
# Prints a Markdown table for docs/BENCHMARKS.md.
#
#   benches/eval.sh [WORKDIR]       (needs scripts/fetch-assets.sh to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet
cargo build --release --quiet --example matmul
bin=$PWD/target/release/surgery
model=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
data=.cache/assets/xsum-test.jsonl
seq=512
tokens=4096

[[ -d $work/smollm2-4-8-4 ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/smollm2-4-8-4" -q >/dev/null
"$bin" plan "$model" --shape 4,8,4 --context "$seq" --json -q > "$work/plan.json"
flops() { python3 -c "import json,sys; p=json.load(open('$work/plan.json')); print([c['forward_flops_per_token'] for c in p['costs']['at_r'] if c['r']==$1][0])"; }

echo "| threads | f32 matmul 1024^3 | r | eval tokens/s | GFLOP/s achieved | share of matmul rate |"
echo "|---|---|---|---|---|---|"
for threads in 1 2; do
    mm=$(RAYON_NUM_THREADS=$threads target/release/examples/matmul 1024 20)
    out=$("$bin" eval "$work/smollm2-4-8-4" --data "$data" --field document --recurrence 1,4 \
        --seq-len $seq --max-tokens $tokens --batch 1 --threads "$threads" --json -q)
    for r in 1 4; do
        tps=$(echo "$out" | python3 -c "import json,sys; print([x['tokens_per_second'] for x in json.load(sys.stdin)['rows'] if x['r']==$r][0])")
        f=$(flops $r)
        python3 -c "t=$tps; f=$f; m=$mm; g=t*f/1e9; print(f'| $threads | {m:.1f} GFLOP/s | $r | {t:.1f} | {g:.1f} | {g/m:.2f} |')"
    done
done
