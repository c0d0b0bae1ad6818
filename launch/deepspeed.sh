#!/usr/bin/env bash
# Launch with the `deepspeed` launcher: launch/deepspeed.sh CONFIG [--set key=value ...]
#   HOSTFILE=launch/hostfile.example  multi-node: one "host slots=N" line per node; the launcher
#                                     reaches the nodes by passwordless ssh (pdsh)
#   NUM_GPUS=N                        processes on this node without a hostfile (default: visible
#                                     GPUs, or 2; on a CPU-only machine these are CPU processes)
#   MASTER_ADDR=host                  with a hostfile: the first node's address (default: its name)
#   MASTER_PORT=29500
#   DEEPSPEED=deepspeed               the launcher executable
#   PYTHON=python                     the interpreter (with llmtrain installed) that counts the
#                                     visible GPUs and checks the config before the launch
# The engine follows the config (parallel.engine=torch|deepspeed); pass
# `--set parallel.engine=deepspeed` to wrap the model with deepspeed.initialize.
# Prints the command it runs; LLMTRAIN_DRY_RUN=1 prints it without running.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set key=value ...]" >&2
  exit 2
fi
args=(--master_port "${MASTER_PORT:-29500}" --module --no_local_rank)
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -r "$HOSTFILE" ]; then
    echo "$0: HOSTFILE=$HOSTFILE is not a readable file" >&2
    exit 2
  fi
  args+=(--hostfile "$HOSTFILE")
  # the job's world size: the slots of every host line (comments and blank lines skipped)
  world=$(awk '{sub(/#.*/, "")} match($0, /slots=[0-9]+/) {n += substr($0, RSTART + 6, RLENGTH - 6)} END {print n + 0}' "$HOSTFILE")
  if [ "$world" = "0" ]; then
    echo "$0: HOSTFILE=$HOSTFILE has no \"host slots=N\" line" >&2
    exit 2
  fi
  if [ -n "${MASTER_ADDR:-}" ]; then
    args+=(--master_addr "$MASTER_ADDR")
  fi
else
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$("${PYTHON:-python}" -c "import torch; print(torch.cuda.device_count() or 2)" \
               2>/dev/null || echo 2)
  fi
  args+=(--num_gpus "$NUM_GPUS")
  world=$NUM_GPUS
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cmd=("${DEEPSPEED:-deepspeed}" "${args[@]}" llmtrain train "$@")
if [ "${LLMTRAIN_DRY_RUN:-0}" = "1" ]; then
  echo "${cmd[*]}"
  exit 0
fi
# Validate once, before the processes start (as launch/torchrun.sh): a config error or a run_dir
# holding a different run is one line and exit code 2.
"${PYTHON:-python}" -m llmtrain train --check "$world" "$@" >/dev/null || exit $?
echo "${cmd[*]}"
exec "${cmd[@]}"
