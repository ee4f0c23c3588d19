#!/usr/bin/env bash
# CI's proof that the code behind the `cuda` feature compiles, on a machine with no GPU and no
# CUDA library: `cargo check` and clippy with `--features cuda`, all targets, using the pinned
# toolkit from scripts/cuda-toolkit.sh (candle-kernels runs nvcc even for a check). Its own target
# directory (target/cuda), so the CPU build is untouched. Cold: a few minutes (the kernels);
# warm: seconds.
#
#   scripts/check-cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-toolkit.sh)"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/target/cuda}
cargo check --features cuda --all-targets
cargo clippy --features cuda --all-targets -- -D warnings
