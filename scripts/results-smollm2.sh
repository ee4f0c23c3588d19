#!/usr/bin/env bash
# Reproduces the SmolLM2 perplexity table of docs/RESULTS.md: held-out XSum perplexity of the
# source model, the (4,8,4) pruned static model, and the (4,8,4) recurrent model with the identity
# adapter (r = 1, 2, 4, 8) and with the paper's reference adapter init (r = 1, 4).
#
#   scripts/results-smollm2.sh [WORKDIR] [MAX_TOKENS]      (after scripts/fetch-assets.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
tokens=${2:-8192}
mkdir -p "$work"
cargo build --release --quiet
bin=$PWD/target/release/surgery
model=.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
data=.cache/assets/xsum-test.jsonl
common=(--data "$data" --field document --seq-len 1024 --max-tokens "$tokens" --batch 1 --json -q)

[[ -d $work/identity ]] || "$bin" apply "$model" --shape 4,8,4 --out "$work/identity" -q >/dev/null
[[ -d $work/reference ]] || "$bin" apply "$model" --shape 4,8,4 --adapter-init reference --out "$work/reference" -q >/dev/null

row() { # NAME JSON
    python3 -c "
import json, sys
v = json.loads(sys.argv[2])
for x in v['rows']:
    r = '-' if x['r'] is None else x['r']
    print(f\"| {sys.argv[1]} | {r} | {x['loss']:.4f} | {x['perplexity']:.2f} | {x['tokens']} |\")
" "$1" "$2"
}

echo "| model | r | loss (nats/token) | perplexity | tokens |"
echo "|---|---|---|---|---|"
row "source (30 layers)" "$("$bin" eval "$model" "${common[@]}")"
row "pruned (4,8,4) static: layers 0..4, 18..30" "$("$bin" eval "$model" --layers 0..4,18..30 "${common[@]}")"
row "recurrent (4,8,4), identity adapter" "$("$bin" eval "$work/identity" --recurrence 1,2,4,8 "${common[@]}")"
row "recurrent (4,8,4), reference adapter" "$("$bin" eval "$work/reference" --recurrence 1,4 "${common[@]}")"
