"""The launch scripts: two torchrun agents (`--nnodes 2`, c10d rendezvous on 127.0.0.1, one
process each) train like one 2-process node; torchrun.sh, slurm.sbatch and deepspeed.sh dry runs
print the command they would run (LLMTRAIN_DRY_RUN=1; a fake `scontrol` stands in for Slurm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (LAUNCH, free_port, launch_script, parallel_overrides, read_losses,
                     run_train, set_args, subprocess_env)

# 2 data-parallel ranks x micro-batch 2 = global batch 8 in two micro-batches each (the
# accumulation crosses the nodes' all-reduce too)
SETS = {"train.micro_batch_size": 2}


def _errors(out: str) -> str:
    """The lines of a failed run that say why (a rank's traceback ends in `...Error: ...`)."""
    lines = [line for line in out.splitlines() if "Error" in line or "error:" in line]
    return "\n".join(lines[-20:]) or out[-4000:]


def test_two_nodes_train_like_one_two_process_node(tmp_path):
    # the one-node reference: 2 ranks forked with torchrun's environment (helpers.train_command;
    # torchrun.sh's single-node command is the dry run's below, and torchrun --standalone runs
    # for real in test_reliability.py), not a third torchrun launch
    one = tmp_path / "one_node"
    run_train(parallel_overrides(one, **SETS), "configs/tiny.yaml", nproc=2)

    two = tmp_path / "two_nodes"
    env = subprocess_env(PYTHON=sys.executable, NNODES="2", NPROC_PER_NODE="1",
                         RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID=f"test-{os.getpid()}")
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), "configs/tiny.yaml",
           *set_args(parallel_overrides(two, **SETS))]
    nodes = [subprocess.Popen(cmd, env={**env, "NODE_RANK": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for n, out in zip(nodes, outs):
        assert n.returncode == 0, _errors(out)
    assert "--nnodes 2 --node_rank 1 --rdzv_backend c10d" in outs[1]
    assert "layout: world 2" in outs[0] + outs[1]
    assert read_losses(two) == pytest.approx(read_losses(one), rel=1e-6)


def test_torchrun_dry_run_single_and_multi_node():
    r = launch_script("torchrun.sh", "cfg.yaml", "--set", "a=1", LLMTRAIN_DRY_RUN="1",
                      NPROC_PER_NODE="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"{sys.executable} -m torch.distributed.run --standalone "
                                f"--nproc_per_node 3 --max-restarts 0 -m llmtrain train "
                                f"cfg.yaml --set a=1")
    r = launch_script("torchrun.sh", "cfg.yaml", LLMTRAIN_DRY_RUN="1", NPROC_PER_NODE="8",
                      NNODES="4", NODE_RANK="2", RDZV_ENDPOINT="node001:29400", RDZV_ID="job7",
                      MAX_RESTARTS="3")
    assert r.returncode == 0, r.stderr
    assert "--standalone" not in r.stdout
    assert ("--nproc_per_node 8 --max-restarts 3 --nnodes 4 --node_rank 2 --rdzv_backend c10d "
            "--rdzv_endpoint node001:29400 --rdzv_id job7 -m llmtrain train cfg.yaml") in r.stdout
    r = launch_script("torchrun.sh", "cfg.yaml", LLMTRAIN_DRY_RUN="1", NPROC_PER_NODE="8",
                      NNODES="2")
    assert r.returncode == 2 and "needs RDZV_ENDPOINT" in r.stderr


def test_slurm_dry_run_takes_the_master_from_the_allocation(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[017-018]" ] '
                                   '&& printf "gpu017\\ngpu018\\n"\n')
    (fake / "scontrol").chmod(0o755)
    r = launch_script("slurm.sbatch", "cfg.yaml", "--set", "a=1", LLMTRAIN_DRY_RUN="1",
                      PATH=f"{fake}{os.pathsep}{os.environ['PATH']}",
                      SLURM_JOB_NODELIST="gpu[017-018]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                      SLURM_GPUS_ON_NODE="4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"srun --kill-on-bad-exit=1 --nodes 2 --ntasks-per-node 1 {sys.executable} -m "
        f"torch.distributed.run --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d "
        f"--rdzv_endpoint gpu017:29500 --rdzv_id 4242 --max-restarts 3 -m llmtrain train "
        f"cfg.yaml --set a=1")


def _outside_slurm(monkeypatch) -> None:
    """As on a workstation: no SLURM_* variables, and neither scontrol nor srun on the PATH."""
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    dirs = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not any((Path(d) / tool).exists() for tool in ("scontrol", "srun"))]
    monkeypatch.setenv("PATH", os.pathsep.join(dirs))


def test_slurm_dry_run_outside_an_allocation_prints_placeholders(monkeypatch):
    _outside_slurm(monkeypatch)
    r = launch_script("slurm.sbatch", "cfg.yaml", "--set", "a=1", LLMTRAIN_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"srun --kill-on-bad-exit=1 --nodes <SLURM_NNODES> --ntasks-per-node 1 {sys.executable} "
        f"-m torch.distributed.run --nnodes <SLURM_NNODES> --nproc_per_node 8 --rdzv_backend c10d "
        f"--rdzv_endpoint <head_node>:29500 --rdzv_id <SLURM_JOB_ID> --max-restarts 3 -m llmtrain "
        f"train cfg.yaml --set a=1")
    assert "not inside a Slurm allocation" in r.stderr and len(r.stderr.splitlines()) == 1


def test_slurm_outside_an_allocation_says_to_submit_it(monkeypatch):
    _outside_slurm(monkeypatch)
    r = launch_script("slurm.sbatch", "cfg.yaml")
    assert r.returncode == 2 and r.stdout == ""
    assert "not inside a Slurm allocation" in r.stderr and "sbatch" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_deepspeed_dry_run_outside_slurm_counts_gpus_with_PYTHON(monkeypatch, tmp_path):
    _outside_slurm(monkeypatch)
    fake = tmp_path / "python"  # stands in for `python -c "...torch.cuda.device_count()..."`
    fake.write_text("#!/bin/sh\necho 5\n")
    fake.chmod(0o755)
    r = launch_script("deepspeed.sh", "cfg.yaml", LLMTRAIN_DRY_RUN="1", PYTHON=str(fake))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("deepspeed --master_port 29500 --module --no_local_rank "
                                "--num_gpus 5 llmtrain train cfg.yaml")
    r = launch_script("deepspeed.sh", "cfg.yaml", LLMTRAIN_DRY_RUN="1", NUM_GPUS="3",
                      DEEPSPEED="/nonexistent/deepspeed")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("/nonexistent/deepspeed --master_port 29500 --module "
                                "--no_local_rank --num_gpus 3 llmtrain train cfg.yaml")


def test_deepspeed_dry_run_with_a_hostfile():
    r = launch_script("deepspeed.sh", "cfg.yaml", "--set", "parallel.engine=deepspeed",
                      LLMTRAIN_DRY_RUN="1", HOSTFILE=str(LAUNCH / "hostfile.example"),
                      MASTER_ADDR="node001", MASTER_PORT="29600")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"deepspeed --master_port 29600 --module --no_local_rank --hostfile "
        f"{LAUNCH / 'hostfile.example'} --master_addr node001 llmtrain train cfg.yaml "
        f"--set parallel.engine=deepspeed")


@pytest.mark.parametrize("name", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
def test_scripts_need_a_config(name):
    r = launch_script(name)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_torchrun_sh_gives_workers_time_to_checkpoint_on_a_stop(tmp_path):
    """torchrun's agent SIGKILLs the workers 30 s after forwarding a SIGTERM or Ctrl-C unless
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise: torchrun.sh raises it to 300 s (the stop
    step's checkpoint of a large model may take longer) and keeps a value the user set. The
    PYTHON here stands in for both the config check and torchrun."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in *--check*) exit 0;; esac\n'
                    'echo "timeout=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"\n')
    fake.chmod(0o755)
    r = launch_script("torchrun.sh", "cfg.yaml", PYTHON=str(fake), NPROC_PER_NODE="2")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "timeout=300", r.stdout + r.stderr
    r = launch_script("torchrun.sh", "cfg.yaml", PYTHON=str(fake), NPROC_PER_NODE="2",
                      TORCH_ELASTIC_SHUTDOWN_TIMEOUT="45")
    assert r.stdout.splitlines()[-1] == "timeout=45", r.stdout + r.stderr


@pytest.mark.parametrize("content, message", [
    (None, "is not a readable file"), ("# a comment\nnode001\n", 'has no "host slots=N" line')])
def test_deepspeed_sh_refuses_a_hostfile_it_cannot_count(tmp_path, content, message):
    """The world size for the config check is the hostfile's slots: a missing file or one
    without slots is one line, exit 2, before anything runs."""
    hostfile = tmp_path / "hostfile"
    if content is not None:
        hostfile.write_text(content)
    r = launch_script("deepspeed.sh", "cfg.yaml", HOSTFILE=str(hostfile))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"{LAUNCH / 'deepspeed.sh'}: HOSTFILE={hostfile} "
                                             f"{message}"], r.stderr
