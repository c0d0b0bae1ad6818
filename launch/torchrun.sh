#!/usr/bin/env bash
# Single-node launch: launch/torchrun.sh CONFIG [--set key=value ...]
# NPROC_PER_NODE defaults to the number of visible GPUs, or 2 on a CPU-only machine.
# Prints the command it runs; LLMTRAIN_DRY_RUN=1 prints it without running.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set key=value ...]" >&2
  exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHON="${PYTHON:-python}"
cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE"
     -m llmtrain train "$@")
echo "${cmd[*]}"
if [ "${LLMTRAIN_DRY_RUN:-0}" = "1" ]; then
  exit 0
fi
exec "${cmd[@]}"
