#!/usr/bin/env bash
# Benchmark: `surgery generate` decoding tokens/s with 1 thread on SmolLM2-135M (4,8,4) at r = 1
# and r = 4: the q8_0 recurrent GGUF with its weights kept as stored (the default), the same file
# with `--dequantize` (f32 weights), and the f32 safetensors checkpoint it was exported from; best
# of 3 runs. Decoding a token reads every weight once, so the baseline measured in the same run is
# memory bandwidth: the weight bytes a token streams (P + rC + K blocks and the output matrix, at
# 34 bytes per 32 values for Q8_0, 4 per value for f32) per second, against a 1-thread copy of a
# 512 MB buffer (numpy, bytes read per second). Prints a Markdown table for docs/BENCHMARKS.md.
#
#   benches/generate.sh [WORKDIR]       (needs scripts/fetch-assets.sh to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet
bin=$PWD/target/release/surgery
model=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
python=.cache/venv/bin/python
tokens=64
prompt="The history of the city begins in the Middle Ages, when"

[[ -d $work/rec ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/rec" -q >/dev/null
[[ -f $work/rec-q8_0.gguf ]] || "$bin" export gguf "$work/rec" --type q8_0 --out "$work/rec-q8_0.gguf" -q >/dev/null
"$bin" plan "$model" --shape 4,8,4 --context 128 --json -q > "$work/plan.json"
# Weights one token reads at r: the blocks run, plus the output matrix.
weights() { python3 -c "import json; p=json.load(open('$work/plan.json')); e=[c['effective_params'] for c in p['costs']['at_r'] if c['r']==$1][0]; print(e + 49152 * 576)"; }
copy=$(OPENBLAS_NUM_THREADS=1 "$python" -c "
import time, numpy as np
a = np.ones(2**27, np.float32); b = np.empty_like(a)
best = 0
for _ in range(5):
    t = time.perf_counter(); np.copyto(b, a); best = max(best, a.nbytes / (time.perf_counter() - t))
print(best / 1e9)")

echo "| model | r | tokens/s (1 thread) | weight GB/s streamed | share of 1-thread copy ($(printf %.1f "$copy") GB/s) |"
echo "|---|---|---|---|---|"
for r in 1 4; do
    for m in "rec-q8_0.gguf" "rec-q8_0.gguf --dequantize" "rec"; do
        read -r file flag <<< "$m"
        bytes=4
        [[ $m == "rec-q8_0.gguf" ]] && bytes=34/32
        runs=()
        for _ in 1 2 3; do
            runs+=("$("$bin" generate "$work/$file" $flag --prompt "$prompt" --recurrence $r --max-tokens $tokens \
                --ignore-eos --threads 1 --json -q | python3 -c "import json,sys; print(json.load(sys.stdin)['report']['tokens_per_second'])")")
        done
        tps=$(python3 -c "import sys; print(max(map(float, sys.argv[1:])))" "${runs[@]}")
        w=$(weights $r)
        python3 -c "t=$tps; g=t*$w*$bytes/1e9; print(f'| $m | $r | {t:.1f} | {g:.2f} | {g/$copy:.2f} |')"
    done
done
