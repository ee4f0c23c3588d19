#!/usr/bin/env bash
# Reproduces the healing result of docs/RESULTS.md: SmolLM2-135M cut to (4,8,4) with the identity
# adapter, healed on the King James Bible (m_max 4, 1-sqrt curriculum), evaluated on held-out XSum
# at r = 1, 2, 4, 8 before and after; and the static pruned model (--static) trained on the same
# data with the same budget of training FLOPs, evaluated the same way.
#
#   scripts/heal-smollm2.sh [WORKDIR] [STEPS]        (after scripts/fetch-assets.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
steps=${2:-30}
mkdir -p "$work"
cargo build --release --quiet
bin=$PWD/target/release/surgery
model=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
xsum=.cache/assets/xsum-test.jsonl
kjv=.cache/assets/kjv.jsonl
train=(--data "$kjv" --seq-len 256 --batch 4 --holdout 0.01 --eval-tokens 2048 --checkpoint-every 0 --force -q --json)
evaluate=(--data "$xsum" --field document --seq-len 1024 --max-tokens 8192 --batch 1 --json -q)

[[ -d $work/identity ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/identity" -q >/dev/null
"$bin" heal "$work/identity" --out "$work/healed" --steps "$steps" --max-mean-recurrence 4 "${train[@]}" > "$work/healed.json"
# The static model gets the training FLOPs the recurrent run spent (6 N per token for every block
# run with gradient, 2 N for the detached ones, lm_head 6 N), in steps of the same size.
static_steps=$(python3 - "$work/healed/metrics.jsonl" <<'PY'
import json, sys
layer, adapter, head = 3_540_096, 2 * 576 * 576, 49152 * 576
recurrent = 0.0
for line in open(sys.argv[1]):
    l = json.loads(line)
    per_micro = l["tokens"] / len(l["iterations_with_grad"])
    for w, g in zip(l["iterations_without_grad"], l["iterations_with_grad"]):
        core = 8 * layer + adapter
        recurrent += per_micro * (6 * 8 * layer + 6 * g * core + 2 * w * core + 6 * head)
tokens = json.loads(line)["tokens"]
static = tokens * (6 * 16 * layer + 6 * head)
print(round(recurrent / static))
PY
)
"$bin" heal "$work/identity" --static --out "$work/static" --steps "$static_steps" "${train[@]}" > "$work/static.json"

row() { # NAME JSON
    python3 -c "
import json, sys
for x in json.loads(sys.argv[2])['rows']:
    print(f\"| {sys.argv[1]} | {x['r'] if x['r'] is not None else '-'} | {x['loss']:.4f} | {x['perplexity']:.1f} |\")
" "$1" "$2"
}
echo "recurrent: $steps steps; static: $static_steps steps (same training FLOPs)"
echo
echo "| model | r | XSum loss | XSum perplexity |"
echo "|---|---|---|---|"
row "(4,8,4) identity, before healing" "$("$bin" eval "$work/identity" --recurrence 1 "${evaluate[@]}")"
row "(4,8,4) healed, m_max 4" "$("$bin" eval "$work/healed" --recurrence 1,2,4,8 "${evaluate[@]}")"
row "static pruned, same FLOPs" "$("$bin" eval "$work/static" --recurrence 1 "${evaluate[@]}")"
