#!/usr/bin/env bash
# Training modes on the real all-MiniLM-L6-v2, W4 g32, init mse (docs/TRAINING_MODES.md).
# Every run: the default recipe (`qat train`) with the overrides printed, a shorter schedule
# (STEPS steps of BATCH sentences) so one run fits a few minutes on a shared 2-core machine,
# dev = the pydoc eval split (DEV sentences), scored on the reloaded export.
# usage: bash scripts/benchmarks/train_modes.sh OUT_DIR [run names...]
set -euo pipefail
OUT=${1:?usage: train_modes.sh OUT_DIR [runs]}; shift
STEPS=${STEPS:-100}; BATCH=${BATCH:-16}; DEV=${DEV:-128}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON="--max_steps $STEPS --per_device_train_batch_size $BATCH --max_eval_samples $DEV --keep_best_steps 25 \
 --save_steps 100000 --logging_steps 10 --disable_tqdm true --overwrite_output true"
declare -A RUNS=(
  [default]=""
  [frozen_1e-5]="--train_mode frozen_codes --adapter none --distill hidden_mse --learning_rate 1e-5 --step_learning_rate 1e-5"
  [frozen_1e-4]="--train_mode frozen_codes --adapter none --distill hidden_mse --learning_rate 1e-4 --step_learning_rate 1e-4"
  [full_1e-5]="--train_mode full_weight --adapter none --distill hidden_mse --learning_rate 1e-5 --step_learning_rate 1e-5"
  [full_1e-4]="--train_mode full_weight --adapter none --distill hidden_mse --learning_rate 1e-4 --step_learning_rate 1e-5"
  [fakequant_hidden]="--distill hidden_mse"
)
NAMES=("$@"); [ ${#NAMES[@]} -eq 0 ] && NAMES=(default frozen_1e-5 frozen_1e-4 full_1e-5 full_1e-4 fakequant_hidden)
for name in "${NAMES[@]}"; do
  cmd="qat train --output_dir $OUT/$name $COMMON ${RUNS[$name]}"
  echo "== $name: $cmd"
  start=$(date +%s)
  $cmd > "$OUT/$name.log" 2>&1
  python - "$OUT/$name/metrics.json" "$name" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); r = m["rows"]; kb = m.get("keep_best") or {}
h = {e["step"]: e["dev_score"] for e in kb.get("history", [])}
print(f"{sys.argv[2]}: post-training {r['post-training']['cosine']:.4f}/{r['post-training']['nn_agreement']:.3f} "
      f"-> qat {r['qat']['cosine']:.4f}/{r['qat']['nn_agreement']:.3f}  best step {kb.get('best_step')} "
      f"dev 1-cos {h}  wall {sys.argv[3]} s", flush=True)
PY
done
