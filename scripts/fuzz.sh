#!/usr/bin/env bash
# Fuzzes one reader of untrusted input for MINUTES minutes (docs/RELIABILITY.md):
#
#   scripts/fuzz.sh TARGET MINUTES        # TARGET: safetensors | gguf | config | plan | checkpoint
#
# Installs cargo-fuzz if missing and builds fuzz/ (its own workspace, target dir fuzz/target);
# both steps are no-ops when already done. Stable Rust is enough: RUSTC_BOOTSTRAP=1 unlocks the
# -Z flags cargo-fuzz passes. The run is single-process and niced, starts from the committed seeds
# in fuzz/seeds/TARGET plus what earlier runs kept in fuzz/corpus/TARGET, and ends with libFuzzer's
# final stats (stat::number_of_executed_units is the execution count). A crash leaves its input
# in fuzz/artifacts/TARGET/ and makes this script fail. The first build compiles the whole crate
# (candle included) with sanitizer and coverage instrumentation: 47 minutes on 2 busy cores here;
# later runs reuse it unless the crate changed.
set -euo pipefail
usage="usage: scripts/fuzz.sh safetensors|gguf|config|plan|checkpoint MINUTES"
target=${1:?$usage}
minutes=${2:?$usage}
case "$target" in safetensors | gguf | config | plan | checkpoint) ;; *) echo "$usage" >&2; exit 1 ;; esac
[[ "$minutes" =~ ^[0-9]+$ ]] || { echo "$usage" >&2; exit 1; }
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
mkdir -p "corpus/$target"
# -malloc_limit_mb: a single allocation above 256 MB is a bug for inputs of at most 64 kB (the
# readers must bound every count by the bytes present); address sanitizer reports it with the
# stack. -rss_limit_mb bounds the whole process the same way.
nice -n 10 cargo fuzz run --release "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time=$((minutes * 60)) -max_len=65536 -malloc_limit_mb=256 -rss_limit_mb=1024 \
    -timeout=10 -print_final_stats=1
