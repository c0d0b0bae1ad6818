#!/usr/bin/env bash
# A small IsoFLOP sweep of tiny models on the default (stdlib) corpus, then the scaling-law fit.
# About 13 minutes of training on 2 idle CPU cores. Usage: examples/scaling_demo.sh [OUT_DIR]
#   1. `llmtrain scaling sweep` writes one run config per (budget, model size) point;
#   2. each runs with the trainer as it is (`llmtrain train`; a finished run is skipped on a rerun);
#   3. `llmtrain scaling fit` fits the laws and plots them (docs/scaling_demo*.png in the repo).
set -euo pipefail
out=${1:-runs/scaling-demo}
budgets=${BUDGETS:-5e11,1.5e12,5e12}
sizes=${SIZES:-100K,200K,400K}
here=$(cd "$(dirname "$0")/.." && pwd)

echo "== sweep: budgets $budgets x sizes $sizes -> $out"
llmtrain scaling sweep --budgets "$budgets" --sizes "$sizes" --base "$here/configs/tiny.yaml" \
  --out "$out"
n=$(ls "$out"/*.yaml | wc -l)
i=0
for cfg in "$out"/*.yaml; do
  i=$((i + 1))
  run=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['logging']['run_dir'])" "$cfg")
  if [ -f "$run/summary.json" ]; then
    echo "== [$i/$n] $cfg: done already"
    continue
  fi
  echo "== [$i/$n] $cfg"
  llmtrain train "$cfg" --set logging.progress=false --set logging.tensorboard=false \
    --set train.log_every=50 --set checkpoint.every=0 | grep -E "^(model|done)"
done
echo "== fit"
llmtrain scaling fit "$out"/runs/* --law all --json "$out/fit.json" --plot "$out/fit.png"
