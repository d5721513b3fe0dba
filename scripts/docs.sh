#!/usr/bin/env bash
# Build the API reference (docs/api: Sphinx autodoc over the docstrings, offline) into build/docs,
# from scratch (-E), with every warning an error (-W --keep-going: all of them are reported, then it fails).
# Uses .venv's python when no virtual environment is active (set PYTHON to choose another); extra
# arguments go to sphinx-build, e.g. `bash scripts/docs.sh -b linkcheck`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m sphinx -E -W --keep-going -q -b html docs/api build/docs "$@"
echo "API reference: build/docs/index.html"
