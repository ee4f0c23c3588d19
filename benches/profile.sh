#!/usr/bin/env bash
# Where a heal step and an eval window spend their time, by kind of op: `perf record` of the
# release binary on the work of benches/heal-vs-peer.sh (SmolLM2-135M (4,8,4); heal: 3 steps of
# batch 2 x 256, AdamW, 1 + 4 iterations, --sampler fixed; eval: 3 windows of 512 tokens at
# r = 4), samples grouped by symbol into op kinds; plus the heal step's phases (forward,
# backward, optimizer) and peak RSS from its metrics.jsonl. Prints Markdown.
#
#   benches/profile.sh [WORKDIR]      (needs perf; scripts/fetch-assets.sh to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
threads=${THREADS:-2}
mkdir -p "$work"
cargo build --release --quiet
bin=$PWD/target/release/surgery
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $threads threads"
[[ -d $work/rec ]] || "$bin" apply .cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf --shape 4,8,4 \
    --out "$work/rec" -q >/dev/null
head -n 3000 .cache/assets/kjv.jsonl >"$work/kjv-part.jsonl"
perf record -q -F 499 -o "$work/heal.perf" -- "$bin" heal "$work/rec" --data "$work/kjv-part.jsonl" \
    --out "$work/prof-heal" --force -q --threads "$threads" --seq-len 256 --batch 2 --steps 3 \
    --sampler fixed --curriculum constant --max-mean-recurrence 5 --backprop-depth 4 \
    --optimizer adamw --holdout 0 --checkpoint-every 0 >/dev/null 2>&1
perf record -q -F 499 -o "$work/eval.perf" -- "$bin" eval "$work/rec" --data .cache/assets/xsum-test.jsonl \
    --field document --recurrence 4 --seq-len 512 --max-tokens 1536 --batch 1 --threads "$threads" \
    -q >/dev/null 2>&1
for what in heal eval; do
    perf report -i "$work/$what.perf" --no-children --sort symbol --stdio --percent-limit 0.01 \
        2>/dev/null >"$work/$what.report"
done
python3 - "$work" <<'PY'
import json, re, sys
work = sys.argv[1]
# Symbol substrings -> op kind, first match wins.
KINDS = [
    ("matmul (gemm)", ["gemm"]),
    ("fused ops (ours)", ["model::fused", "heal::inplace"]),
    ("softmax/exp/log/sqrt (unary)", ["unary_map", "Exp", "Log", "Sqrt", "expf", "logf", "exp", "log"]),
    ("elementwise binary (add, mul, div, broadcast)", ["binary_map"]),
    ("affine", ["Affine", "affine"]),
    ("reductions (sum, max)", ["Reduce", "reduce"]),
    ("copies (contiguous, transpose, cat, narrow)", ["copy_strided", "copy2d", "Copy", "memcpy", "memmove", "cat", "transpose"]),
    ("index_select / gather / embedding", ["index_select", "IndexSelect", "Gather", "gather", "index_add", "IndexAdd", "scatter"]),
    ("allocation, zeroing and page faults", ["[k] ", "malloc", "free", "mmap", "munmap", "alloc", "memset", "zero"]),
    ("thread barriers (candle's spin-wait)", ["BarrierGuard", "rayon", "crossbeam", "sched_yield"]),
]
def group(report):
    totals = {}
    for line in open(report):
        m = re.match(r"\s*([\d.]+)%\s+\[([.k])\]\s+(.*?)[\s-]*$", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), ("[k] " if m.group(2) == "k" else "") + m.group(3)
        kind = next((k for k, subs in KINDS if any(s in sym for s in subs)), "other")
        totals[kind] = totals.get(kind, 0.0) + pct
    return totals
heal, ev = group(f"{work}/heal.report"), group(f"{work}/eval.report")
print("| op kind | heal step, % of samples | eval window (r = 4), % of samples |")
print("|---|---:|---:|")
for k in [k for k, _ in KINDS] + ["other"]:
    print(f"| {k} | {heal.get(k, 0):.1f} | {ev.get(k, 0):.1f} |")
lines = [json.loads(l) for l in open(f"{work}/prof-heal/metrics.jsonl")][1:]
if lines and "seconds" in lines[0]:
    f, b, o = (sum(l["seconds"][p] for l in lines) / len(lines) for p in ("forward", "backward", "optimizer"))
    tot = sum(l["tokens"] / l["tokens_per_second"] for l in lines) / len(lines)
    print(f"\nheal step phases (mean of steps 1-2): forward + loss {f:.2f} s, backward {b:.2f} s, "
          f"optimizer {o:.2f} s, of {tot:.2f} s; peak RSS {lines[-1].get('peak_rss_mb', 0):.0f} MB")
PY
