#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, nvcc and a Rust toolchain: builds with the `cuda` feature and
# runs the same 20-step heal of a small synthetic recurrent model on the CPU and on the GPU, then
# compares the training losses step by step (relative difference at most 1e-2). Exit 0 when they
# agree. (No GPU machine here has a Rust toolchain; issue 11 carries a prebuilt binary instead.)
#
#   scripts/gpu-check.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --features cuda
cargo build --release --features cuda --example synth
bin=$PWD/target/release/surgery
target/release/examples/synth "$work/src" --preset tiny --layers 6 --byte-tokenizer >/dev/null
"$bin" apply "$work/src" --shape 2,2,2 --adapter-noise 0.05 --out "$work/rec" --force -q >/dev/null
python3 -c "
text = 'In the beginning God created the heaven and the earth. And the earth was without form, and void.'
open('$work/train.txt', 'w').write('\n\n'.join(f'{i}. {text}' for i in range(200)))
"
for device in cpu cuda; do
    "$bin" heal "$work/rec" --data "$work/train.txt" --out "$work/$device" --device "$device" --steps 20 \
        --seq-len 64 --batch 4 --max-mean-recurrence 4 --holdout 0 --checkpoint-every 0 --force -q >/dev/null
done
python3 - "$work/cpu/metrics.jsonl" "$work/cuda/metrics.jsonl" <<'PY'
import json, sys
cpu = [json.loads(l)["loss"] for l in open(sys.argv[1])]
gpu = [json.loads(l)["loss"] for l in open(sys.argv[2])]
worst = max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu))
print(f"steps {len(cpu)}; first loss cpu {cpu[0]:.5f} gpu {gpu[0]:.5f}; last cpu {cpu[-1]:.5f} gpu {gpu[-1]:.5f}; worst relative difference {worst:.2e}")
sys.exit(0 if len(cpu) == len(gpu) == 20 and worst <= 1e-2 else 1)
PY
