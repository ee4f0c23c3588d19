#!/usr/bin/env bash
# Issue 21, part 6: checkpoints go both ways between `surgery` and the paper's own trainer
# (../shared/peer's RavenForCausalLM under transformers 4.51, installed by benches/peer-setup.sh
# into .cache/peer-venv; a few minutes and a large torch wheel the first time, so outside CI).
# scripts/check_peer_interop.py heals a SmolLM2 (4,8,4) cut with the binary, loads it into the
# peer with strict names and compares the losses at r = 1, 2, 4 with `surgery eval`; then reads
# the peer's save_pretrained output back with `surgery eval`, `export gguf` and `heal`. Prints the
# table; exit 1 on a difference over 1e-5 (relative). About two minutes once the peer is there.
#
#   scripts/check-peer-interop.sh          (needs scripts/fetch-assets.sh to have run)
#
# Environment: SURGERY_BIN (default: target/debug/surgery, built here).
set -euo pipefail
cd "$(dirname "$0")/.."
benches/peer-setup.sh
if [[ -z ${SURGERY_BIN:-} ]]; then
    cargo build --quiet --bin surgery
    SURGERY_BIN=target/debug/surgery
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PYTHONPATH=.cache/peer-T:../shared/peer .cache/peer-venv/bin/python scripts/check_peer_interop.py \
    --surgery "$SURGERY_BIN" --work "$work"
