#!/usr/bin/env bash
# Launch with torchrun: launch/torchrun.sh CONFIG [--set key=value ...]
#   NPROC_PER_NODE=N       processes per node (default: visible GPUs, or 2 on a CPU-only machine)
#   NNODES=1               nodes; above 1, run this script once on every node with
#   NODE_RANK=0              this node's index (0 .. NNODES-1)
#   RDZV_ENDPOINT=host:port  the c10d rendezvous, on node 0 (required when NNODES > 1)
#   RDZV_ID=llmtrain         the same on every node of one job
#   MAX_RESTARTS=0         restart the whole group this often after a crashed rank (each restart
#                          resumes from the newest checkpoint: checkpoint.resume=auto)
#   PYTHON=python
# A single node without RDZV_ENDPOINT runs --standalone (a private rendezvous on a free port).
# Prints the command it runs; LLMTRAIN_DRY_RUN=1 prints it without running.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set key=value ...]" >&2
  exit 2
fi
PYTHON="${PYTHON:-python}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)" \
                   2>/dev/null || echo 2)
fi
NNODES="${NNODES:-1}"
args=(--nproc_per_node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}")
if [ "$NNODES" = "1" ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  args=(--standalone "${args[@]}")
else
  if [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "$0: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node)" >&2
    exit 2
  fi
  args+=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
         --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-llmtrain}")
fi
# After SIGTERM (preemption) or Ctrl-C the workers finish their step and write a checkpoint;
# torchrun's agent SIGKILLs them after this many seconds (torch's default, 30, can cut a large
# model's save short; torch before 2.13 ignores the variable).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cmd=("$PYTHON" -m torch.distributed.run "${args[@]}" -m llmtrain train "$@")
if [ "${LLMTRAIN_DRY_RUN:-0}" = "1" ]; then
  echo "${cmd[*]}"
  exit 0
fi
# Validate once, before N processes start: a config error (or a run_dir holding a different
# run) is then one line and exit code 2, instead of the same error from every rank and
# torchrun's ChildFailedError report. The command is printed once it is going to run.
"$PYTHON" -m llmtrain train --check "$((NPROC_PER_NODE * NNODES))" "$@" >/dev/null || exit $?
echo "${cmd[*]}"
exec "${cmd[@]}"
