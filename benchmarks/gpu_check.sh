#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a short lease on a GPU machine:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Each step writes OUT_DIR/<step>.log (and JSON where it has figures) and has its own time limit,
# so one failing or slow step does not cost the others. Steps:
#   train_fp32, train_bf16  configs/tiny.yaml on CUDA for 50 steps in fp32 and bf16 (autocast);
#                           compare_precisions checks the bf16 losses follow the fp32 ones
#   init_1b                 build the Llama-1B shape on the GPU: meta, materialise, layout-free
#                           init (model/init.py); seconds and peak memory
#   loss_memory             the memory-lean loss against the plain one on CUDA, if
#                           benchmarks/loss_memory.py exists
#   pytest_gpu              the tests marked `gpu` (skipped without CUDA)
#   bench_1b                `llmtrain bench` at the Llama-1B shape, bf16, beside Hugging Face
#                           LlamaForCausalLM eager and compiled in the same process
# Needs: torch with CUDA, transformers (bench), megatron-core (the data pipeline).
set -u
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run, log, report the exit code
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "rc=$rc after $((SECONDS - start))s" | tee -a "$OUT/$name.log"
    tail -n 6 "$OUT/$name.log"
}

TINY=(--set train.device=cuda --set train.steps=50 --set train.eval_every=0
      --set train.log_every=10 --set logging.tensorboard=false --set logging.progress=false
      --set checkpoint.every=0)
step train_fp32 240 "$PY" -m llmtrain train configs/tiny.yaml "${TINY[@]}" \
    --set logging.run_dir="$OUT/run_fp32" --set train.precision=fp32
step train_bf16 180 "$PY" -m llmtrain train configs/tiny.yaml "${TINY[@]}" \
    --set logging.run_dir="$OUT/run_bf16" --set train.precision=bf16
step compare_precisions 30 "$PY" - "$OUT/run_fp32" "$OUT/run_bf16" <<'EOF'
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f"{d}/metrics.jsonl")] for d in sys.argv[1:])
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"fp32 {a[0]:.4f} -> {a[-1]:.4f}; bf16 {b[0]:.4f} -> {b[-1]:.4f}; "
      f"largest relative difference {worst:.4f} over {len(a)} logged steps")
sys.exit(0 if worst < 0.02 and a[-1] < a[0] else 1)
EOF
step init_1b 120 "$PY" - <<'EOF'
import time, torch
from llmtrain.config import load_config
from llmtrain.model import build_model
from llmtrain.parallel.init import materialize_shards
cfg = load_config("configs/llama-1b.yaml")
model = build_model(cfg.model, "meta").to(torch.bfloat16)
torch.cuda.reset_peak_memory_stats()
seconds = materialize_shards(model, torch.device("cuda"), cfg.train.seed)
n = sum(p.numel() for p in model.parameters())
print(f"layout-free init of {n:,} parameters (bf16) on {torch.cuda.get_device_name()}: "
      f"{seconds:.1f} s ({seconds / n * 1e9:.2f} ns per parameter), peak "
      f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
EOF
if [ -f benchmarks/loss_memory.py ]; then
    step loss_memory 150 "$PY" benchmarks/loss_memory.py --device cuda
fi
step pytest_gpu 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
step bench_1b 300 "$PY" -m llmtrain bench configs/llama-1b.yaml --set train.device=cuda \
    --set train.precision=bf16_pure --batch 4 --steps 10 --warmup 3 --compare hf \
    --json "$OUT/bench_1b.json"
echo "== done: logs in $OUT"
