#!/usr/bin/env bash
# The main job on the embedded default: set up, then fit hierarchical LoRA adapters for 16
# Shakespeare speakers on SmolLM2-135M-Instruct and print per-task test perplexity before/after.
# Extra arguments go to `bora fit` (e.g. --tau-mode fixed --tau 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bora fit --output "${BORA_OUTPUT:-runs/shakespeare}" "$@"
