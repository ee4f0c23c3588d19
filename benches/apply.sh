#!/usr/bin/env bash
# Benchmark: `surgery apply` throughput as a ratio to copying the same source files with `cp` in
# the same run, and apply's peak resident memory, on synthetic TinyLlama-shaped bf16 checkpoints of
# two sizes (11 and 22 layers). Both contenders read a warm page cache and end with an fsync of
# what they wrote; each is run 3 times, alternating, after a `sync`, and the median is kept.
# Prints a Markdown table for docs/BENCHMARKS.md.
#
#   benches/apply.sh [WORKDIR]     (needs about 12 GB free in WORKDIR; default: a temporary dir)
# Needs /usr/bin/time (Debian package `time`) and bc.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet --example synth
cargo build --release --quiet
bin=$PWD/target/release/surgery

seconds() { # wall seconds of a command
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }

echo "| layers | source | cp -r + fsync (median of 3) | surgery apply (median of 3) | apply / cp throughput | apply peak RSS |"
echo "|---|---|---|---|---|---|"
for layers in 11 22; do
    src=$work/tinyllama-$layers
    [[ -d $src ]] || target/release/examples/synth "$src" --preset tinyllama --layers "$layers" --dtype bf16 >/dev/null
    bytes=$(du -sb "$src" | cut -f1)
    cat "$src"/* >/dev/null # warm the page cache for both contenders alike
    # Every layer used, so apply writes as much as cp copies.
    "$bin" plan "$src" --prelude 0..4 --core 4..$((layers - 4)) --coda $((layers - 4))..$layers \
        --out "$work/plan.json" --force -q >/dev/null
    cps=() applies=()
    for _ in 1 2 3; do
        rm -rf "$work/cp" "$work/out"; sync
        cps+=("$(seconds bash -c "cp -r '$src' '$work/cp' && sync '$work/cp'/*")")
        rm -rf "$work/cp"; sync
        applies+=("$(seconds "$bin" apply "$work/plan.json" --out "$work/out" -q)")
    done
    out_bytes=$(du -sb "$work/out" | cut -f1)
    rm -rf "$work/out"; sync
    rss=$(/usr/bin/time -v "$bin" apply "$work/plan.json" --out "$work/out" -q 2>&1 >/dev/null |
        awk -F': ' '/Maximum resident set size/ {print $2}')
    cp_s=$(median "${cps[@]}")
    apply_s=$(median "${applies[@]}")
    printf "| %s | %.2f GB | %.2f s (%.0f MB/s) | %.2f s (%.0f MB/s) | %.2f | %.0f MB |\n" \
        "$layers" "$(echo "$bytes/1000000000" | bc -l)" \
        "$cp_s" "$(echo "$bytes/$cp_s/1000000" | bc -l)" \
        "$apply_s" "$(echo "$out_bytes/$apply_s/1000000" | bc -l)" \
        "$(echo "($out_bytes/$apply_s)/($bytes/$cp_s)" | bc -l)" "$(echo "$rss/1024" | bc -l)"
    rm -rf "$work/out"
done
