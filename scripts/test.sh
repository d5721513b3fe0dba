#!/usr/bin/env bash
# Set up, lint (ruff), build the API reference (scripts/docs.sh: warnings are errors), then run the default
# test suite (the slow marker is excluded by pyproject's addopts; run `pytest -m slow` for those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m ruff check src tests benchmarks analysis examples docs scripts
bash scripts/docs.sh
python -m pytest "$@"
