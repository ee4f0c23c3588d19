"""Table of build-and-check.sh's results: llama.cpp against `surgery` on the same GGUF files.

usage: report.py WORK "1 4 8" CTX CHUNKS MODEL   (exit 1 when a bound of issue 9 is not met)
"""

import json
import re
import sys

import numpy as np
from gguf import GGUFReader

work, rs, ctx, chunks, model = (sys.argv[1], [int(r) for r in sys.argv[2].split()], int(sys.argv[3]),
                                int(sys.argv[4]), sys.argv[5])
BOUND_PPL = {"f32": 0.005, "q8_0": 0.01}  # relative perplexity difference
BOUND_LOGITS = {"f32": 1e-3, "olmo2": 1e-3}  # max |logit difference|, last token
failures = []


def llama_ppl(path):
    """The last running value of llama-perplexity's `[i]ppl,` list (the whole run's perplexity)."""
    text = open(path).read()
    values = re.findall(r"\[(\d+)\]([0-9.]+),", text)
    if not values:
        sys.exit(f"report: no perplexity in {path}")
    n, ppl = values[-1]
    if int(n) != chunks:
        sys.exit(f"report: {path} scored {n} windows, expected {chunks}")
    return float(ppl)


def llama_logits(path):
    reader = GGUFReader(path)
    t = {x.name: x for x in reader.tensors}
    tokens = [int(v) for v in np.asarray(t["tokens"].data).reshape(-1)]
    logits = np.asarray(t["logits"].data, dtype=np.float32).reshape(len(tokens), -1)
    return tokens, logits[-1]


def tokens_per_second(log):
    m = re.search(r"\beval time =\s*[0-9.]+ ms /\s*(\d+) runs.*?([0-9.]+) tokens per second", open(log).read())
    if not m:
        sys.exit(f"report: no eval timing in {log}")
    return float(m.group(2)), int(m.group(1))


print(f"\nModel: {model}")
print(f"\nPerplexity, XSum ({chunks} windows of {ctx - 1} scored tokens, {chunks * (ctx - 1)} tokens), "
      "llama.cpp -t 1 (f32 KV cache, no flash attention) vs surgery eval, same GGUF; last columns: "
      "llama.cpp at its default settings (f16 KV cache, flash attention)")
print("| type | r | llama.cpp | surgery | rel. diff | bound | llama.cpp defaults | rel. diff |")
print("|---|---|---|---|---|---|---|---|")
for t in ("f32", "q8_0"):
    ours = {row["r"]: row for row in json.load(open(f"{work}/ppl-surgery-{t}.json"))["rows"]}
    for r in rs:
        if ours[r]["tokens"] != chunks * (ctx - 1):
            sys.exit(f"report: surgery eval scored {ours[r]['tokens']} tokens at r={r}, expected {chunks * (ctx - 1)}")
        a, b = llama_ppl(f"{work}/ppl-llama-{t}-r{r}.log"), ours[r]["perplexity"]
        rel = abs(a - b) / b
        ok = rel <= BOUND_PPL[t]
        if not ok:
            failures.append(f"perplexity {t} r={r}: {a:.4f} vs {b:.4f}")
        default = "| - | - |"
        if t == "q8_0":
            d = llama_ppl(f"{work}/ppl-llama-q8_0-default-r{r}.log")
            default = f"| {d:.4f} | {100 * abs(d - b) / b:.3f}% |"
        print(f"| {t} | {r} | {a:.4f} | {b:.4f} | {100 * rel:.3f}% | {100 * BOUND_PPL[t]:g}% {'ok' if ok else 'FAIL'} {default}")

print("\nControl: q8_0 through llama.cpp's own `llama` architecture (no patch), same windows and settings")
print("| model | llama.cpp | surgery | rel. diff |")
print("|---|---|---|---|")
for m, label in (("pruned", "pruned static (4+8+4 layers), = recurrent r=1"), ("smollm2", "SmolLM2-135M, all 30 layers")):
    a = llama_ppl(f"{work}/ppl-llama-{m}-llama-q8_0.log")
    b = json.load(open(f"{work}/ppl-surgery-{m}-llama-q8_0.json"))["rows"][0]["perplexity"]
    print(f"| {label} | {a:.4f} | {b:.4f} | {100 * abs(a - b) / b:.3f}% |")

print("\nLast-token logits of the prompt, llama-results vs our forward (same token ids; olmo2: the f32 model"
      " rewritten with OLMo-2 blocks by olmo2_fixture.py)")
print("| type | r | tokens | max abs diff | argmax llama / ours | bound |")
print("|---|---|---|---|---|---|")
for t in ("f32", "q8_0", "olmo2"):
    ours = json.load(open(f"{work}/logits-surgery-{t}.json"))
    for r in rs:
        tokens, theirs = llama_logits(f"{work}/logits-llama-{t}-r{r}.gguf")
        if tokens != ours["tokens"]:
            failures.append(f"logits {t} r={r}: token ids differ ({tokens} vs {ours['tokens']})")
            continue
        mine = np.asarray(ours["logits"][str(r)], dtype=np.float32)
        diff = float(np.max(np.abs(theirs - mine)))
        bound = BOUND_LOGITS.get(t)
        ok = bound is None or diff <= bound
        if not ok:
            failures.append(f"logits {t} r={r}: max abs diff {diff:.2e}")
        verdict = "-" if bound is None else f"{bound:g} {'ok' if ok else 'FAIL'}"
        print(f"| {t} | {r} | {len(tokens)} | {diff:.2e} | {int(theirs.argmax())} / {int(mine.argmax())} | {verdict} |")

print("\nGeneration, q8_0, greedy, one thread (decode tokens/s, prefill excluded)")
print("| r | llama.cpp tok/s | surgery tok/s | llama.cpp text |")
print("|---|---|---|---|")
for r in (1, 4):
    tps, runs = tokens_per_second(f"{work}/gen-llama-r{r}.log")
    ours = json.load(open(f"{work}/gen-surgery-r{r}.json"))
    text = open(f"{work}/gen-llama-r{r}.txt").read().strip().replace("\n", " ")
    if not text:
        failures.append(f"llama-completion r={r} wrote no text")
    print(f"| {r} | {tps:.1f} | {ours['report']['tokens_per_second']:.1f} | {text[:80]!r} |")

if failures:
    print("\nFAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("\nall checks passed")
