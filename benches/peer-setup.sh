#!/usr/bin/env bash
# Installs the peer (../shared/peer: the paper's PyTorch model) into .cache/peer-venv and
# .cache/peer-T, as its README says; idempotent. Outside CI: the torch wheel is large.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/peer-venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch numpy safetensors packaging pyyaml regex requests tqdm filelock
fi
if [[ ! -d .cache/peer-T/transformers ]]; then
    "$venv/bin/pip" install --quiet --target .cache/peer-T --no-deps \
        transformers==4.51.0 tokenizers==0.21.1 huggingface-hub==0.30.2
fi
