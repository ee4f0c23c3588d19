#!/usr/bin/env bash
# Issue 20: surgery's recurrent outputs load in Hugging Face transformers and give `surgery
# eval`'s losses. Makes (once) a venv in .cache/transformers-venv with the pinned torch and
# transformers of scripts/check-transformers.requirements.txt (about 2 minutes and 5.6 GB the
# first time), builds the binary, then scripts/check_transformers.py builds recurrent checkpoints
# from fixtures/tiny/ (apply, heal, export, OLMo-2 blocks, Llama-3 RoPE), loads each with
# AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and compares its next-token
# losses at r = 1, 2, 4 with `surgery eval --json` (1e-5 relative). Prints the table; exit 1 on a
# difference. About a minute once the venv exists.
#
#   scripts/check-transformers.sh
#
# Environment: SURGERY_BIN (default: target/debug/surgery, built here), TRANSFORMERS_VENV
# (default .cache/transformers-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=scripts/check-transformers.requirements.txt
venv=${TRANSFORMERS_VENV:-$PWD/.cache/transformers-venv}
stamp=$venv/installed-$(sha256sum "$requirements" | cut -c1-16)
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
