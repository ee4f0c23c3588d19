#!/usr/bin/env bash
# Cross-entropy against distillation at equal tokens on SmolLM2-135M (issue 17), a small version
# of what docs/RESULTS.md reports: the (4,8,4) rule cut of SmolLM2-135M-Instruct (Q4_1 GGUF) healed
# on the King James Bible with CE alone and with `--distill` from the source (alpha 0.5, T 2), the
# same steps, data and seed; both evaluated on held-out XSum documents (never trained on) at
# r = 1, 2, 4, 8 beside the source. Prints a Markdown table and the CPU it ran on.
#
#   scripts/distill-compare.sh [WORKDIR]     (STEPS=30 BATCH=2 SEQ_LEN=256 EVAL_TOKENS=2048)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-.cache/distill-compare}
steps=${STEPS:-30}
batch=${BATCH:-2}
seq_len=${SEQ_LEN:-256}
eval_tokens=${EVAL_TOKENS:-2048}
mkdir -p "$work"
scripts/fetch-assets.sh >/dev/null
cargo build --release --quiet
bin=$PWD/target/release/surgery
model=$PWD/.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -d $work/rec ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/rec" -q >/dev/null
for run in ce distill; do
    extra=()
    [[ $run == distill ]] && extra=(--distill "$model")
    [[ -f $work/$run/manifest.json ]] || "$bin" heal "$work/rec" --data .cache/assets/kjv.jsonl \
        --out "$work/$run" --force -q --steps "$steps" --batch "$batch" --seq-len "$seq_len" \
        --max-mean-recurrence 4 --holdout 0 --checkpoint-every 0 "${extra[@]}" >/dev/null
done
evaluate() {
    [[ -f $work/$2.json ]] || "$bin" eval "$1" --data .cache/assets/xsum-test.jsonl --field document \
        --recurrence 1,2,4,8 --seq-len 1024 --max-tokens "$eval_tokens" --json -q >"$work/$2.json"
}
evaluate "$model" source
evaluate "$work/rec" cut
evaluate "$work/ce" ce
evaluate "$work/distill" distill
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) threads"
python3 - "$work" "$steps" <<'PY'
import json, sys
work, steps = sys.argv[1], sys.argv[2]
def rows(name):
    d = json.load(open(f"{work}/{name}.json"))
    return {r["r"]: r["perplexity"] for r in d["rows"]}
def seconds(run):
    lines = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl")]
    return sum(m["tokens"] / m["tokens_per_second"] for m in lines), sum(m["tokens"] for m in lines)
src = rows("source")[1]
print(f"\nXSum perplexity, {steps} steps; the source: {src:.2f}\n")
print("| model | heal s | tokens | r = 1 | r = 2 | r = 4 | r = 8 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, label in [("cut", "(4,8,4) cut, not healed"), ("ce", "healed, CE"), ("distill", "healed, distilled")]:
    t = rows(name)
    s, n = seconds(name) if name != "cut" else (0, 0)
    print(f"| {label} | {s:.0f} | {n} | " + " | ".join(f"{t[r]:.2f}" for r in (1, 2, 4, 8)) + " |")
PY
