#!/usr/bin/env bash
# A small IsoFLOP sweep of tiny models on the default (stdlib) corpus, then the scaling-law fit.
# About 13 minutes of training on 2 idle CPU cores. Usage: examples/scaling_demo.sh [OUT_DIR]
#   BUDGETS=5e11,1.5e12,5e12  training FLOPs, one IsoFLOP group each
#   SIZES=100K,200K,400K      non-embedding model sizes
#   FIT_ARGS="..."            more `llmtrain scaling fit` options, e.g. "--bootstrap 20"
#   PYTHON=python3            reads the sweep's sweep.json
#   1. `llmtrain scaling sweep` writes one run config per (budget, model size) point; a budget
#      below one training step of a size stops the demo here (exit 2), before any training;
#   2. each runs with the trainer as it is (`llmtrain train`, output in OUT_DIR/logs; a finished
#      run is skipped on a rerun; a failed one is reported and left out of the fit);
#   3. `llmtrain scaling fit` fits the laws and plots them (docs/scaling_demo*.png in the repo);
#      it warns about what the runs cannot determine, or says how many runs it needs (exit 2).
set -euo pipefail
out=${1:-runs/scaling-demo}
budgets=${BUDGETS:-5e11,1.5e12,5e12}
sizes=${SIZES:-100K,200K,400K}
here=$(cd "$(dirname "$0")/.." && pwd)
read -ra fit_args <<< "${FIT_ARGS:-}"

echo "== sweep: budgets $budgets x sizes $sizes -> $out"
llmtrain scaling sweep --budgets "$budgets" --sizes "$sizes" --base "$here/configs/tiny.yaml" \
  --out "$out"
# One "config<TAB>run_dir" line per point of this sweep (not stale configs of an earlier one).
points=$("${PYTHON:-python3}" - "$out/sweep.json" "$0" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["points"]
# The sweep warns when rounding to whole steps misses a budget by over 1.5x: below one step.
short = [r for r in rows if "warning" in r]
if short:
    step = {r["name"]: 6 * r["N"] * r["D"] / r["steps"] for r in rows}  # FLOPs of one step
    worst = max(short, key=lambda r: step[r["name"]] / r["C_target"])
    sys.exit(f"{sys.argv[2]}: BUDGETS too small: {worst['C_target']:.3g} FLOPs is less than one "
             f"training step of the {worst['N']:.3g}-parameter model ({step[worst['name']]:.3g} "
             f"FLOPs); use budgets of at least {max(step.values()):.3g}, or smaller SIZES")
print("\n".join(f"{r['config']}\t{r['run_dir']}" for r in rows))
EOF
) || exit 2
n=$(wc -l <<< "$points")
mkdir -p "$out/logs"
finished=()
failed=0
i=0
while IFS=$'\t' read -r cfg run <&3; do
  i=$((i + 1))
  if [ -f "$run/summary.json" ]; then
    echo "== [$i/$n] $cfg: done already"
    finished+=("$run")
    continue
  fi
  echo "== [$i/$n] $cfg"
  log="$out/logs/$(basename "$cfg" .yaml).log"
  if llmtrain train "$cfg" --set logging.progress=false --set logging.tensorboard=false \
       --set train.log_every=50 --set checkpoint.every=0 > "$log" 2>&1; then
    grep -E "^(model|done)" "$log" || true
    finished+=("$run")
  else
    echo "   failed (exit $?); the end of $log:"
    tail -n 5 "$log" | sed 's/^/   /'
    failed=$((failed + 1))
  fi
done 3<<< "$points"
if [ "$failed" -gt 0 ]; then
  echo "== $failed of $n run(s) failed (logs in $out/logs); the fit uses the ${#finished[@]} others"
fi
if [ "${#finished[@]}" -eq 0 ]; then
  echo "$0: no run finished; see $out/logs" >&2
  exit 1
fi
echo "== fit"
llmtrain scaling fit "${finished[@]}" --law all --json "$out/fit.json" --plot "$out/fit.png" \
  ${fit_args[@]+"${fit_args[@]}"}
