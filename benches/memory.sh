#!/usr/bin/env bash
# Benchmark (issue 18): peak resident memory of `surgery eval --max-tokens 4096` and `surgery heal`
# on one single-document .jsonl of 200 MB against the same runs on a 1 MB one. Both must read and
# tokenize the text in bounded pieces and stop once they have the tokens they use, so the two
# peaks should agree within 10%. The text is the King James Bible (.cache/assets/kjv.jsonl, from
# scripts/fetch-assets.sh) joined into one document and repeated; the model is the tiny fixture
# (fixtures/tiny) cut to (3,4,3) with `surgery apply`. Prints a Markdown table for
# docs/BENCHMARKS.md, and the CPU it ran on.
#
#   benches/memory.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet
bin=$PWD/target/release/surgery

[[ -d $work/tiny-rec ]] ||
    "$bin" apply fixtures/tiny/model --shape 3,4,3 --out "$work/tiny-rec" -q >/dev/null
# One JSON object on one line whose "text" is the whole Bible, repeated to `mb` megabytes.
make_doc() {
    local mb=$1 out=$2
    [[ -f $out ]] && return
    python3 - "$mb" "$out" <<'PY'
import json, sys
mb, out = int(sys.argv[1]), sys.argv[2]
verses = [json.loads(l)["text"] for l in open(".cache/assets/kjv.jsonl")]
chunk = json.dumps(" ".join(verses) + " ")[1:-1]  # the escaped body of one JSON string
with open(out, "w") as f:
    f.write('{"id": 0, "text": "')
    written = 0
    while written < mb * 1_000_000:
        part = chunk[: mb * 1_000_000 - written]
        # never end inside an escape sequence
        while part.endswith("\\"):
            part = part[:-1]
        f.write(part)
        written += len(part)
    f.write('"}\n')
PY
}
make_doc 1 "$work/doc-1mb.jsonl"
make_doc 200 "$work/doc-200mb.jsonl"

# Peak RSS in MB of a command, from GNU time.
peak() {
    /usr/bin/time -v "$@" 2>"$work/time.txt" >/dev/null
    awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$work/time.txt"
}
eval_peak() {
    peak "$bin" eval "$work/tiny-rec" --data "$1" --max-tokens 4096 --seq-len 128 \
        --recurrence 1,4 --threads 1 -q
}
heal_peak() {
    peak "$bin" heal "$work/tiny-rec" --data "$1" --out "$work/healed" --force --steps 4 \
        --seq-len 128 --batch 8 --checkpoint-every 0 --threads 1 -q
}

grep -m1 "model name" /proc/cpuinfo
echo
echo "| input | file size | eval peak RSS | heal peak RSS |"
echo "|---|---|---|---|"
declare -A e h
for mb in 1 200; do
    f=$work/doc-${mb}mb.jsonl
    e[$mb]=$(eval_peak "$f")
    h[$mb]=$(heal_peak "$f")
    size=$(python3 -c "import os; print(f'{os.path.getsize(\"$f\") / 1e6:.1f} MB')")
    echo "| one document, ${mb} MB | $size | ${e[$mb]} MB | ${h[$mb]} MB |"
done
python3 -c "print(f'| ratio 200 MB / 1 MB | | {${e[200]} / ${e[1]}:.3f} | {${h[200]} / ${h[1]}:.3f} |')"
