#!/usr/bin/env bash
# Benchmark (issue 17): peak resident memory of a full heal against a LoRA heal of the same
# TinyLlama-shaped (4,8,4) model: a synthetic 16-layer source of TinyLlama-1.1B's shape (hidden
# 2048, 32 heads, 4 KV heads, FFN 5632, vocabulary 32000; random weights, a byte tokenizer) cut to
# (4,8,4), 2 steps of 1 x 64 tokens on the KJV, AdamW, no checkpoints. Prints a Markdown table for
# docs/BENCHMARKS.md and the CPU it ran on.
#
#   benches/lora-memory.sh [WORKDIR] [RANK]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
rank=${2:-16}
mkdir -p "$work"
cargo build --release --quiet --example synth
cargo build --release --quiet
bin=$PWD/target/release/surgery
[[ -d $work/src ]] || target/release/examples/synth "$work/src" --preset tinyllama --layers 16 \
    --dtype bf16 --byte-tokenizer >/dev/null
[[ -d $work/rec ]] || "$bin" apply "$work/src" --shape 4,8,4 --out "$work/rec" -q >/dev/null
head -n 2000 .cache/assets/kjv.jsonl >"$work/kjv-part.jsonl"
heal() {
    local out=$1
    shift
    /usr/bin/time -f "%M %e" -o "$work/$out.time" "$bin" heal "$work/rec" --data "$work/kjv-part.jsonl" \
        --out "$work/$out" --force -q --seq-len 64 --batch 1 --steps 2 --optimizer adamw \
        --holdout 0 --checkpoint-every 0 "$@" >/dev/null
    read -r kb seconds <"$work/$out.time"
    printf '| %s | %.0f | %.0f |\n' "$out" "$(echo "$kb / 1024" | bc -l)" "$seconds"
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) threads"
echo
echo "| heal of the TinyLlama-shaped (4,8,4) cut | peak RSS, MB | wall, s |"
echo "|---|---:|---:|"
heal full
heal "lora-$rank" --lora "$rank"
