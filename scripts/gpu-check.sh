#!/usr/bin/env bash
# Proves on a GPU machine that the CUDA path runs, agrees with the CPU and is fast, with binaries
# built elsewhere (the lent GPU machines have no Rust toolchain and no network):
#
#   scripts/build-gpu.sh && scripts/gpu-check.sh prepare    # here: dist/ (binaries, model, text)
#   scripts/gpu-check.sh [run] [WORKDIR]                     # there, from the repository root
#   scripts/gpu-check.sh dry-run [WORKDIR]                   # here: every step on the CPU, small
#
# `run` finds the CUDA 13 libraries (the driver's libcuda.so.1, and cuBLAS, cuBLASLt, cuRAND, NVRTC
# and the runtime in the machine's Python site-packages, where PyTorch's wheels put them), then:
#   (a) the same 20-step heal of the tiny fixture on the CPU and on the GPU: every step's training
#       loss within 1e-2 relative;
#   (b) SmolLM2 (4,8,4) perplexity at r = 1, 4, 8 on the CPU and on the GPU: within 0.5%;
#   (c) heal throughput of a TinyLlama-shaped synthetic model (22 layers, bf16 weights, (4,8,4)) on
#       the GPU: tokens/s and MFU against the bf16 matmul rate measured in the same run.
# It prints one Markdown table (for docs/BENCHMARKS.md) and exits 1 if (a) or (b) disagrees.
#
# What travels (scripts/build-gpu.sh and `prepare` write it, about 60 MB): dist/surgery-cuda.xz,
# dist/synth-cuda.xz and dist/matmul-cuda.xz (the binaries, stripped and compressed); dist/smollm2-
# pruned-4-8-4.q4_0.gguf, SmolLM2-135M-Instruct's layers 0..4, 18..30 (the (4,8,4) model's, its
# adapter still [0 | I]) as Q4_0, since the source Q4_1 GGUF (98 MB) would not fit; `run` applies
# (4,8,4) to it with small adapter noise (0.003, as the llama.cpp check), so r matters but the
# perplexity stays bounded; dist/xsum-held.jsonl, held-out text. The tiny
# fixture (fixtures/tiny) is in the repository. FIXTURE and FIXTURE_TEXT override its paths.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
work=${2:-$(mktemp -d)}
mkdir -p "$work"
fixture=${FIXTURE:-fixtures/tiny/model}
fixture_text=${FIXTURE_TEXT:-fixtures/tiny/text/train.txt}
smol=dist/smollm2-pruned-4-8-4.q4_0.gguf
held=dist/xsum-held.jsonl
die() { echo "gpu-check.sh: $*" >&2; exit 1; }

prepare() {
    local assets=.cache/assets
    [[ -f $assets/SmolLM2-135M-Instruct.Q4_1.gguf ]] || scripts/fetch-assets.sh
    cargo build --release --quiet --bin surgery
    local bin=target/release/surgery
    mkdir -p dist
    "$bin" apply "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --shape 4,8,4 --out "$work/smol-identity" --force -q >/dev/null
    # The identity adapter ignores the state, so this is exactly the pruned static model.
    "$bin" export gguf "$work/smol-identity" --arch llama --type q4_0 --out "$smol" --force -q >/dev/null
    head -n 200 "$assets/xsum-test.jsonl" >"$held.partial"
    mv "$held.partial" "$held"
    ls -l dist | awk 'NR > 1 {printf "%-40s %6.1f MB\n", $NF, $5 / 1e6; total += $5} END {printf "%-40s %6.1f MB\n", "total", total / 1e6}'
}

# The directories holding the CUDA 13 libraries, joined by ':'; fails naming what is missing.
cuda_library_path() {
    python3 - <<'PY'
import glob, os, site, sys
roots = list(dict.fromkeys([*site.getsitepackages(), site.getusersitepackages(), *sys.path]))
dirs = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")))]
need = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"]
found = {n: next((d for d in dirs if os.path.exists(os.path.join(d, n))), None) for n in need}
missing = [n for n, d in found.items() if d is None]
if missing:
    sys.exit(f"gpu-check.sh: no {', '.join(missing)} under nvidia/*/lib in {sys.executable}'s site-packages ({', '.join(roots)})")
print(":".join(dict.fromkeys(found.values())))
PY
}

unpack() { # NAME -> path of the runnable binary
    if [[ -f dist/$1 ]]; then
        echo "dist/$1"
    elif [[ -f dist/$1.xz ]]; then
        python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" "dist/$1.xz" "$work/$1"
        chmod +x "$work/$1"
        echo "$work/$1"
    else
        die "no dist/$1 or dist/$1.xz: run scripts/build-gpu.sh where Rust is"
    fi
}

case $mode in
prepare)
    prepare
    exit 0
    ;;
run)
    libs=$(cuda_library_path)
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    bin=$(unpack surgery-cuda)
    synth=$(unpack synth-cuda)
    matmul=$(unpack matmul-cuda)
    if ldd "$bin" | grep -q 'not found'; then
        die "$(ldd "$bin" | grep 'not found' | tr -s '\t\n' '  ')(libcuda.so.1 comes with the NVIDIA driver, 580 or newer for CUDA 13)"
    fi
    gpu=cuda
    big=(--preset tinyllama --layers 22) big_shape=4,8,4 big_seq=1024 big_batch=8 big_steps=8
    mm_n=8192 eval_tokens=4096
    ;;
dry-run)
    cargo build --release --quiet --bin surgery --example synth --example matmul
    bin=target/release/surgery synth=target/release/examples/synth matmul=target/release/examples/matmul
    gpu=cpu
    big=(--preset tiny --layers 6) big_shape=2,2,2 big_seq=128 big_batch=2 big_steps=4
    mm_n=512 eval_tokens=256
    [[ -f $smol && -f $held ]] || prepare
    ;;
*) die "unknown mode $mode: expected run, dry-run or prepare" ;;
esac
[[ -f $smol && -f $held ]] || die "no $smol or $held: run scripts/gpu-check.sh prepare where the assets are"
[[ -f $fixture/config.json && -f $fixture_text ]] || die "no fixture at $fixture (config.json) and $fixture_text"
echo "gpu-check: $mode, device $gpu, work in $work" >&2

# (a) The fixture: recurrent as it is, or (P, C, K) = (n/4, rest, n/4) of a static one; adapter
# noise so the state path carries gradient.
shape=$(python3 -c "
import json, sys
c = json.load(open(sys.argv[1]))
n = c.get('num_hidden_layers') or c.get('n_layers')
p = max(1, n // 4)
print('' if c.get('model_type') == 'huginn_raven' else f'{p},{n - 2 * p},{p}')" "$fixture/config.json")
rec=$fixture
if [[ -n $shape ]]; then
    "$bin" apply "$fixture" --shape "$shape" --adapter-noise 0.05 --out "$work/fixture-rec" --force -q >/dev/null
    rec=$work/fixture-rec
fi
# Outputs are named by side (cpu, gpu), so that dry-run's "GPU" side, the CPU, has its own.
device_of() { if [[ $1 == gpu ]]; then echo "$gpu"; else echo cpu; fi; }
for side in cpu gpu; do
    rm -rf "$work/heal-$side" "$work/heal-$side.checkpoints"
    "$bin" heal "$rec" --data "$fixture_text" --out "$work/heal-$side" --device "$(device_of $side)" --steps 20 \
        --seq-len 64 --batch 4 --max-mean-recurrence 4 --holdout 0 --checkpoint-every 0 --force -q >/dev/null
done

# (b) SmolLM2 (4,8,4) at r = 1, 4, 8.
"$bin" apply "$smol" --shape 4,8,4 --adapter-noise 0.003 --state-init zero --seed 0 --out "$work/smol" --force -q >/dev/null
for side in cpu gpu; do
    "$bin" eval "$work/smol" --data "$held" --field document --recurrence 1,4,8 --seq-len 512 \
        --max-tokens "$eval_tokens" --device "$(device_of $side)" --json -q >"$work/eval-$side.json"
done

# (c) Heal throughput: TinyLlama-shaped, bf16 weights, constant m = 4, against the matmul rates.
# One sequence per pass: candle's backward keeps every intermediate, and at seq-len 1024 each of
# up to 72 blocks with gradient holds about 0.7 GB of attention scores and softmax per sequence.
"$synth" "$work/big-src" "${big[@]}" --dtype bf16 --byte-tokenizer >/dev/null
"$bin" apply "$work/big-src" --shape "$big_shape" --adapter-noise 0.05 --out "$work/big" --force -q >/dev/null
rm -rf "$work/heal-big" "$work/heal-big.checkpoints"
"$bin" heal "$work/big" --data "$held" --field document --out "$work/heal-big" --device "$gpu" \
    --steps "$big_steps" --seq-len "$big_seq" --batch "$big_batch" --micro-batch 1 --curriculum constant \
    --max-mean-recurrence 4 --backprop-depth 8 --holdout 0 --checkpoint-every 0 --force -q >/dev/null
mm_bf16=$("$matmul" "$mm_n" 20 --device "$gpu" --dtype bf16)
mm_f32=$("$matmul" "$mm_n" 20 --device "$gpu" --dtype f32)

python3 - "$work" "$gpu" "$mm_bf16" "$mm_f32" "$big_seq" <<'PY'
import json, sys
work, gpu, mm_bf16, mm_f32, seq = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
ok = True
print(f"| check | CPU | {gpu.upper()} | relative difference | bound |")
print("|---|---|---|---|---|")

cpu = [json.loads(l)["loss"] for l in open(f"{work}/heal-cpu/metrics.jsonl")]
dev = [json.loads(l)["loss"] for l in open(f"{work}/heal-gpu/metrics.jsonl")]
worst = max(abs(a - b) / abs(a) for a, b in zip(cpu, dev))
good = len(cpu) == len(dev) == 20 and worst <= 1e-2
ok &= good
print(f"| (a) fixture heal, 20 steps, loss first / last | {cpu[0]:.4f} / {cpu[-1]:.4f} | {dev[0]:.4f} / {dev[-1]:.4f} | {worst:.1e} (worst step) | 1e-2 {'ok' if good else 'FAILED'} |")

cpu = json.load(open(f"{work}/eval-cpu.json"))["rows"]
dev = json.load(open(f"{work}/eval-gpu.json"))["rows"]
for a, b in zip(cpu, dev):
    diff = abs(a["perplexity"] - b["perplexity"]) / a["perplexity"]
    good = a["r"] == b["r"] and diff <= 5e-3
    ok &= good
    print(f"| (b) SmolLM2 (4,8,4) perplexity, r = {a['r']}, {a['tokens']} tokens (tokens/s) | {a['perplexity']:.3f} ({a['tokens_per_second']:.0f}) | {b['perplexity']:.3f} ({b['tokens_per_second']:.0f}) | {diff:.1e} | 5e-3 {'ok' if good else 'FAILED'} |")
ok &= len(cpu) == len(dev) == 3

# FLOPs per token, forward + backward: 6 N for every block run with gradient, 2 N without, the
# adapter with each core iteration, 6 N for lm_head; attention scores and values (PaLM's
# convention, full T x T as computed) 12 T d per layer with gradient, 4 T d without.
c = json.load(open(f"{work}/heal-big/config.json"))
h, q, kv, ffn = c["n_embd"], c["n_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
layer = h * q + 2 * h * kv + q * h + 3 * h * ffn
p, core, k = c["n_layers_in_prelude"], c["n_layers_in_recurrent_block"], c["n_layers_in_coda"]
adapter, head = 2 * h * h, c["vocab_size"] * h
att = seq * q
lines = [json.loads(l) for l in open(f"{work}/heal-big/metrics.jsonl")][2:]   # two steps warm up
tokens = sum(l["tokens"] for l in lines)
seconds = sum(l["tokens"] / l["tokens_per_second"] for l in lines)
flops = 0
for l in lines:
    per_micro = l["tokens"] / len(l["iterations_with_grad"])
    for w, g in zip(l["iterations_without_grad"], l["iterations_with_grad"]):
        it = core * layer + adapter
        flops += per_micro * (6 * (p + k) * layer + 6 * g * it + 2 * w * it + 6 * head
                              + 12 * att * (p + k + g * core) + 4 * att * w * core)
rate = flops / seconds / 1e12
name = "TinyLlama-shaped" if h == 2048 else f"synthetic (hidden {h})"
print(f"| (c) heal {name} ({p},{core},{k}), bf16 weights, m = 4, seq-len {seq}, {len(lines)} steps timed | | {tokens / seconds:.0f} tokens/s, {rate:.2f} TFLOP/s | MFU {rate / (mm_bf16 / 1e3):.3f} of bf16 matmul {mm_bf16 / 1e3:.1f} TFLOP/s ({rate / (mm_f32 / 1e3):.3f} of f32 {mm_f32 / 1e3:.1f}) | |")
sys.exit(0 if ok else 1)
PY
