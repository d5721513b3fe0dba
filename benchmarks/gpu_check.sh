#!/usr/bin/env bash
# GPU checks for a machine with one CUDA GPU (about 6-8 minutes on an H200). Run from the repository root
# in an environment where `import bora` works with a CUDA build of torch (e.g. `pip install -e .[test]`
# over a CUDA torch; `pip install bitsandbytes` adds the quantised-base tests):
#
#     bash benchmarks/gpu_check.sh            # results: benchmarks/RESULTS_gpu.md (+ gpu_out/)
#
# 1. the CUDA tests (tests/test_cuda.py: bf16 fit vs CPU, 4-/8-bit bitsandbytes base) and the
#    data-parallel tests on this machine's CPU side;
# 2. one short fit of the embedded default on cuda (bf16 autocast), printed test perplexity;
# 3. `benchmarks/run.py --device cuda` at one setting: tokens/s of plain PEFT LoRA vs bora MAP vs
#    mean-field on the 0.5B-class random-init Llama ('gpu' preset) in bf16, 64 tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_OUT:-benchmarks/gpu_out}
mkdir -p "$OUT"
$PY - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA GPU visible to torch " + torch.__version__)
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__, "bf16", torch.cuda.is_bf16_supported())
PY
{
  echo "# GPU check ($(date -u +%Y-%m-%d), $($PY -c 'import torch; print(torch.cuda.get_device_name(0))'))"
  echo
  echo "Command: \`bash benchmarks/gpu_check.sh\`"
  echo
  echo "## 1. CUDA and data-parallel tests"
  echo '```'
  $PY -m pytest -q -rs tests/test_cuda.py tests/test_distributed.py 2>&1 | tail -n 15
  echo '```'
  echo
  echo "## 2. Short fit of the embedded default on cuda (bf16 autocast)"
  echo '```'
  timeout 300 $PY -m bora fit --device cuda --epochs 1 --eval-every 31 --output "$OUT/fit" --overwrite --quiet 2>&1 | tail -n 8
  echo '```'
  echo
  echo "## 3. Step throughput, 0.5B random-init Llama, bf16, 64 tasks"
  echo
  timeout 300 $PY benchmarks/run.py --device cuda --sections step --step-tasks 64 --repeats 20 \
      --step-variants plain,map,meanfield --json "$OUT/results_gpu.json" --md "$OUT/step.md" >/dev/null 2>"$OUT/step.log" \
      && cat "$OUT/step.md" || { echo "benchmark failed:"; tail -n 20 "$OUT/step.log"; }
} | tee benchmarks/RESULTS_gpu.md
