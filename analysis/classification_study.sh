#!/usr/bin/env bash
# The classification study on an embedded classification corpus (CORPUS: shakespeare-who, the default, or
# fortunes-mine): bora (learned tau, Laplace posterior) against one shared LoRA and one LoRA per task, 3 fitting
# seeds each, test rows and out-of-distribution rows.
#
#   bash analysis/classification_study.sh RUNS_DIR [SEEDS...]      # e.g. bash analysis/classification_study.sh /tmp/cls 0 1 2
#   CORPUS=fortunes-mine bash analysis/classification_study.sh /tmp/mine
#   python analysis/classification.py --fits learned=RUNS_DIR/learned_s0/eval.json,... (analysis/README.md)
#
# Settings (every fit: --data $CORPUS, --epochs $EPOCHS, --eval-every 10, --patience 6, bora's defaults
# otherwise: lr 2e-3, rank 8, batch 16):
#   learned   bora's default: learned tau, Laplace posterior (bora evaluate averages 10 posterior draws)
#   shared    --tau-mode shared --guide map: one LoRA for every task
#   per_task  --hierarchy AB --tau-mode uncoupled --early-stopping per_task --guide map: each task its own A and B,
#             no coupling, and its adapter from its own best validation step (one LoRA per task)
#   meanfield --guide meanfield: learned tau, mean-field posterior started from the MAP (10 draws averaged)
#   learned_pt --early-stopping per_task: bora's default, each task's adapter from its own best validation step
# SETTINGS="learned shared" picks some (default: learned shared per_task meanfield).
# Every fit is evaluated on its test split and on two out-of-distribution files (analysis/ood_rows.py: Shakespeare
# and fortune texts the fit never saw), each row under a trained task's adapter.
set -euo pipefail
RUNS=${1:?usage: classification_study.sh RUNS_DIR [SEEDS...]}
shift
SEEDS=("$@")
[[ ${#SEEDS[@]} -eq 0 ]] && SEEDS=(0 1 2)
EPOCHS=${EPOCHS:-6}
CORPUS=${CORPUS:-shakespeare-who}
PY=${PYTHON:-python}
BORA=${BORA:-bora}
mkdir -p "$RUNS"
for kind in plays fortunes; do
  $PY analysis/ood_rows.py --corpus "$CORPUS" --kind "$kind" --out "$RUNS/ood_$kind.jsonl"
done
COMMON=(--data "$CORPUS" --epochs "$EPOCHS" --eval-every 10 --patience 6 --quiet)
declare -A FLAGS=(
  [learned]=""
  [shared]="--tau-mode shared --guide map"
  [per_task]="--hierarchy AB --tau-mode uncoupled --early-stopping per_task --guide map"
  [meanfield]="--guide meanfield"
  [learned_pt]="--early-stopping per_task"
)
read -r -a NAMES <<< "${SETTINGS:-learned shared per_task meanfield}"
for seed in "${SEEDS[@]}"; do
  for name in "${NAMES[@]}"; do
    out="$RUNS/${name}_s$seed"
    if [[ ! -f "$out/eval.json" ]]; then
      # shellcheck disable=SC2086
      $BORA fit "${COMMON[@]}" ${FLAGS[$name]} --seed "$seed" --output "$out" --overwrite > "$out.log" 2>&1
      $BORA evaluate "$out" --json "$out/eval.json" --quiet >> "$out.log" 2>&1
    fi
    for kind in plays fortunes; do
      [[ -f "$out/ood_$kind.json" ]] || $BORA evaluate "$out" --data "$RUNS/ood_$kind.jsonl" \
        --json "$out/ood_$kind.json" --quiet >> "$out.log" 2>&1
    done
    echo "$(date +%T) done $out"
  done
done
