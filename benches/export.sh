#!/usr/bin/env bash
# Benchmark: `surgery export gguf` throughput (MB/s of source tensor data read) for --type f16 and
# q4_k_m on SmolLM2-135M, against `cp` of the same source file in the same run (both end with an
# fsync of what they wrote), from two sources: llama.cpp's Q4_1 GGUF (dequantized, then encoded)
# and the f32 safetensors checkpoint `export safetensors` makes of it. Three alternating runs
# each, medians; peak RSS of the export. Prints a Markdown table for docs/BENCHMARKS.md.
#
#   benches/export.sh [WORKDIR]       (needs scripts/fetch-assets.sh to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet
bin=$PWD/target/release/surgery
gguf=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -d $work/st ]] || "$bin" export safetensors "$gguf" --dtype f32 --out "$work/st" -q >/dev/null

now() { date +%s.%N; }
median() { python3 -c "import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }

echo "| source | --type | source MB | cp MB/s (median of 3) | export MB/s of source (median of 3) | export / cp | export peak RSS |"
echo "|---|---|---|---|---|---|---|"
for src in "$gguf" "$work/st"; do
    file=$src
    [[ -d $src ]] && file=$src/model.safetensors
    mb=$(python3 -c "import os; print(os.path.getsize('$file') / 1e6)")
    for type in f16 q4_k_m; do
        cps=() exps=() rss=0
        for _ in 1 2 3; do
            sync
            t0=$(now); cp "$file" "$work/copy"; sync "$work/copy"; t1=$(now)
            cps+=("$(python3 -c "print($mb / ($t1 - $t0))")")
            rm -f "$work/copy"
            sync
            out=$( { /usr/bin/time -f "%M" "$bin" export gguf "$src" --type "$type" \
                --out "$work/out.gguf" --force --json -q > "$work/report.json"; } 2>&1 )
            rss=$out
            exps+=("$(python3 -c "import json; r=json.load(open('$work/report.json')); print(r['source_bytes'] / 1e6 / r['seconds'])")")
            rm -f "$work/out.gguf"
        done
        cp_m=$(median "${cps[@]}")
        ex_m=$(median "${exps[@]}")
        name=$(basename "$src")
        python3 -c "print(f'| $name | $type | {$mb:.0f} | {$cp_m:.0f} | {$ex_m:.0f} | {$ex_m / $cp_m:.2f} | {$rss / 1024:.0f} MB |')"
    done
done
