#!/usr/bin/env bash
# Benchmark (issue 22): our Q8_0 / Q4_0 kernels (src/model/qkernels) against candle-core's
# k_quants kernels (what the stored path ran before), an f32 product (what `--dequantize` runs)
# and a plain memory copy, with 1 and 2 threads; then, if scripts/fetch-assets.sh has run,
# `surgery generate` (1 thread) and `surgery eval` (2 threads) on SmolLM2-135M (4,8,4) q8_0,
# stored against `--dequantize`. Every ratio worth quoting is between lines of the same run:
# this machine is shared (other engineers compile on its 2 cores), so absolute numbers move
# with its load, which the script prints before and after.
#
#   benches/qkernels.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet
cargo build --release --quiet --example qkernels
bin=$PWD/target/release/surgery
grep -m1 "model name" /proc/cpuinfo
grep -m1 "^flags" /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512vl|avx512_vnni|avx_vnni)$' | tr '\n' ' '
echo
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"

# Kernels: matrix-vector over the whole SmolLM2-135M stack (GB/s of stored bytes; the f32 line
# in GB/s of its own bytes is that value times the factor the example prints), and 511-row
# products over one layer (rows/s). Best of 5, runs interleaved.
for t in 1 2; do
    RAYON_NUM_THREADS=$t target/release/examples/qkernels 5 | sed "s/^/threads=$t /"
done

model=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
data=.cache/assets/xsum-test.jsonl
if [[ ! -f $model || ! -f $data ]]; then
    echo "no assets (scripts/fetch-assets.sh): kernels only"
    exit 0
fi
[[ -d $work/rec ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/rec" -q >/dev/null
[[ -f $work/rec-q8_0.gguf ]] || "$bin" export gguf "$work/rec" --type q8_0 --out "$work/rec-q8_0.gguf" -q >/dev/null
prompt="The history of the city begins in the Middle Ages, when"
tps() { python3 -c "import json,sys; print(json.load(sys.stdin)['report']['tokens_per_second'])"; }
echo "| weights | r | generate tokens/s (1 thread, best of 3) | eval tokens/s (2 threads) |"
echo "|---|---|---|---|"
for r in 1 4; do
    for flag in "" "--dequantize"; do
        runs=()
        for _ in 1 2 3; do
            runs+=("$("$bin" generate "$work/rec-q8_0.gguf" $flag --prompt "$prompt" --recurrence $r \
                --max-tokens 64 --ignore-eos --threads 1 --json -q | tps)")
        done
        gen=$(python3 -c "import sys; print(max(map(float, sys.argv[1:])))" "${runs[@]}")
        ev=$("$bin" eval "$work/rec-q8_0.gguf" $flag --data "$data" --field document --recurrence $r \
            --seq-len 511 --max-tokens 2044 --batch 1 --threads 2 --json -q |
            python3 -c "import json,sys; print(json.load(sys.stdin)['rows'][0]['tokens_per_second'])")
        python3 -c "print(f'| ${flag:-stored Q8_0} | $r | {$gen:.1f} | {$ev:.1f} |')"
    done
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
