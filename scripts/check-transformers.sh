#!/usr/bin/env bash
# Issue 20: surgery's recurrent outputs load in Hugging Face transformers and give `surgery
# eval`'s losses. Makes (once) a venv with the pinned torch and transformers of
# scripts/check-transformers.requirements.txt in ~/.cache/surgery-transformers-venv (about 2
# minutes and 5.6 GB the first time): outside the repository, so that every clone (CI's fresh
# one included) shares one install instead of 5.6 GB each. Then it builds the binary, and
# scripts/check_transformers.py builds recurrent checkpoints from fixtures/tiny/ (apply, heal,
# export, OLMo-2, Qwen2 and Qwen3 blocks, Llama-3 RoPE), loads each with
# AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and compares its next-token
# losses at r = 1, 2, 4 with `surgery eval --json` (1e-5 relative). Prints the table; exit 1 on a
# difference. About a minute once the venv exists.
#
#   scripts/check-transformers.sh
#
# Environment: SURGERY_BIN (default: target/debug/surgery, built here), TRANSFORMERS_VENV
# (default: ${XDG_CACHE_HOME:-~/.cache}/surgery-transformers-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=scripts/check-transformers.requirements.txt
venv=${TRANSFORMERS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/surgery-transformers-venv}
# The pins, not the comments, decide whether the venv is the one asked for.
stamp=$venv/installed-$(grep -v '^#' "$requirements" | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
    echo "check-transformers: installing torch and transformers into $venv (minutes, once) ..." >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    touch "$stamp"
fi
if [[ -z ${SURGERY_BIN:-} ]]; then
    cargo build --quiet --bin surgery
    SURGERY_BIN=target/debug/surgery
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" scripts/check_transformers.py --surgery "$SURGERY_BIN" --work "$work"
