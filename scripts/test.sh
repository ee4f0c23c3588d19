#!/usr/bin/env bash
# The test command: fetch the real assets (idempotent), then run every test with them required,
# so a missing asset fails instead of skipping. Every test target runs even after one fails, so a
# failing run shows all that fails, not the first target's failures alone.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
SURGERY_REQUIRE_ASSETS=1 cargo test --no-fail-fast "$@"
