"""`parallel.engine: deepspeed` on the CPU (gloo, DeepSpeed's CPU accelerator; the first run
JIT-builds DeepSpeed's shared-memory comm op, cached afterwards): at dp=2 the per-step losses and
gradient norms equal the torch engine's at the same ZeRO stage, ZeRO-3 allocates only each rank's
partitions while initialising and starts from the single-process weights, a resume from a
DeepSpeed checkpoint continues the loss curve, and `launch/deepspeed.sh` starts 2 local
processes."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (PARALLEL_STEPS, ROOT, cut_back, free_port, launch_script, parallel_overrides,
                     read_losses, read_metric, run_command, run_train, set_args)

# micro-batch 2 at dp=2 and global batch 8: two accumulation steps per optimizer step
DS = {"parallel.engine": "deepspeed", "train.micro_batch_size": 2}


@pytest.fixture(scope="module", autouse=True)
def no_stale_build_lock():
    """A process killed while JIT-building DeepSpeed's comm op leaves torch's build `lock` behind,
    and every later run waits on it forever: fail at once, naming the file, instead."""
    from torch.utils.cpp_extension import _get_build_directory
    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    if lock.is_file() and time.time() - lock.stat().st_mtime > 600:
        pytest.fail(f"{lock} is older than 10 minutes (a build was killed); delete it")


@pytest.fixture(scope="module")
def torch_engine(tmp_path_factory):
    """The torch engine at dp=2 per ZeRO stage: (losses, grad norms), built once per stage."""
    root = tmp_path_factory.mktemp("torch_engine")
    cache = {}

    def get(stage: int) -> tuple[list[float], list[float]]:
        if stage not in cache:
            run = root / f"zero{stage}"
            run_train(parallel_overrides(run, **{"parallel.zero_stage": stage,
                                                 "train.micro_batch_size": 2}), nproc=2)
            cache[stage] = read_losses(run), read_metric(run, "grad_norm")
        return cache[stage]
    return get


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_matches_torch_engine(stage, tmp_path, torch_engine):
    losses, norms = torch_engine(stage)
    run = tmp_path / "ds"
    run_train(parallel_overrides(run, **DS, **{"parallel.zero_stage": stage}), nproc=2)
    assert read_losses(run) == pytest.approx(losses, rel=1e-4)
    assert read_metric(run, "grad_norm") == pytest.approx(norms, rel=1e-4)
    meta = json.loads((run / "checkpoints" / "step_5" / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and (run / "checkpoints" / "step_5" /
                                              "manifest.json").is_file()


def test_deepspeed_zero3_initialises_only_its_partitions(tmp_path):
    """dp=2 ZeRO-3 (tests/initial_weights.py): while the model is built and its parameters
    initialised, no rank allocates a tensor larger than its partition (half) of the largest
    parameter (the whole model materialised first would allocate every full weight), and the
    weights gathered from the partitions equal the single-process initial weights exactly."""
    from llmtrain.config import load_config
    from llmtrain.model import build_model
    sets = parallel_overrides(tmp_path / "run", **DS, **{"parallel.zero_stage": 3})
    script = Path(__file__).with_name("initial_weights.py")
    run_command([sys.executable, str(script.with_name("fork_ranks.py")), "2", "--call",
                 str(script), str(tmp_path), *sets], timeout=240)
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    cfg = load_config(None, sets)
    reference = build_model(cfg.model, seed=cfg.train.seed)  # as the single-process run starts
    for rec in records:
        assert rec["weights"].keys() == reference.state_dict().keys()
        for k, v in reference.state_dict().items():
            assert torch.equal(rec["weights"][k], v), k
    sizes = [p.numel() for p in reference.parameters()]
    largest = max(rec["largest_allocation"] for rec in records)
    assert largest <= max(-(-n // 2) for n in sizes) < max(sizes), (largest, sizes)


def test_deepspeed_resume_continues_the_loss_curve(tmp_path, torch_engine):
    """ZeRO-2 with its partitioned optimizer states: stop after the step-3 checkpoint, resume to
    step 5; the losses equal the uninterrupted run's."""
    losses, _ = torch_engine(2)
    run = tmp_path / "resume"
    args = parallel_overrides(run, **DS, **{"parallel.zero_stage": 2, "checkpoint.every": 3})
    run_train(args, nproc=2)
    cut_back(run, 3, PARALLEL_STEPS)
    r = run_train(args, nproc=2)  # every file read back through engines/deepspeed.safe_load
    assert "resumed from" in r.stdout and "step_3" in r.stdout
    assert read_losses(run) == pytest.approx(losses, rel=1e-4)

    # A crafted optimizer partition (manifest recomputed, as anyone can) must not run its code:
    # DeepSpeed's own loader unpickles with weights_only=False.
    from llmtrain.train.checkpoint import write_manifest
    step = run / "checkpoints" / "step_3"
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Payload(marker)},
               step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_manifest(step)
    shutil.rmtree(run / "checkpoints" / "step_5")
    r = run_train(args, nproc=2, check=False)
    assert r.returncode != 0 and not marker.exists()
    assert "holds objects a DeepSpeed checkpoint does not" in r.stderr, r.stderr[-2000:]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_torch_engine_checkpoint_is_refused_by_the_deepspeed_engine(tmp_path):
    """A torch-engine (DCP) checkpoint is not silently fed to DeepSpeed."""
    from llmtrain.config import ConfigError, load_config
    from llmtrain.engines.deepspeed import load_checkpoint
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"step": 1}))
    with pytest.warns(UserWarning, match="no manifest.json"), \
            pytest.raises(ConfigError, match="written by the torch engine"):
        # refused from meta.json alone, before the engine is touched
        load_checkpoint(None, load_config(None, []), torch.device("cpu"), ckpt)


def test_deepspeed_launcher_runs_two_cpu_processes(tmp_path, torch_engine):
    """`launch/deepspeed.sh` with NUM_GPUS=2 on a CPU-only machine: the launcher spawns 2
    processes (DeepSpeed's CPU accelerator) that train like the torch engine."""
    losses, _ = torch_engine(1)
    run = tmp_path / "launcher"
    args = parallel_overrides(run, **DS, **{"parallel.zero_stage": 1})
    r = launch_script("deepspeed.sh", "configs/tiny.yaml", *set_args(args), timeout=400, cwd=ROOT,
                      NUM_GPUS="2", MASTER_PORT=str(free_port()),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.startswith("deepspeed --master_port")
    assert read_losses(run) == pytest.approx(losses, rel=1e-4)


@pytest.mark.parametrize("sets, world, message", [
    ({"parallel.tp": 2}, 2, "engine=deepspeed runs data parallelism \\(ZeRO\\) only; got "
                            "parallel.tp=2"),
    ({"parallel.dp_replicate": 2}, 2, "got parallel.dp_replicate=2"),
    ({"parallel.offload": "cpu", "parallel.zero_stage": 0}, 2, "needs parallel.zero_stage=1, 2"),
])
def test_deepspeed_refuses_what_it_cannot_do(tmp_path, sets, world, message):
    from llmtrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config(None, parallel_overrides(tmp_path, **{"parallel.engine": "deepspeed", **sets}),
                    world_size=world)


def test_offload_nvme_needs_deepspeed_and_a_path(tmp_path):
    from llmtrain.config import ConfigError, load_config
    from llmtrain.engines.deepspeed import build_config
    with pytest.raises(ConfigError, match="offload=nvme needs parallel.engine=deepspeed"):
        load_config(None, parallel_overrides(tmp_path, **{"parallel.offload": "nvme"}))
    cfg = load_config(None, parallel_overrides(tmp_path, **{"parallel.offload": "nvme",
                                                            "parallel.engine": "deepspeed",
                                                            "parallel.zero_stage": 3}))
    with pytest.raises(ConfigError, match="offload_optimizer.nvme_path"):
        build_config(cfg, dp_size=1)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {
        "offload_optimizer": {"nvme_path": "/nvme"}, "offload_param": {"nvme_path": "/nvme"}}}))
    cfg.parallel.deepspeed_config = str(user)
    ds, _ = build_config(cfg, dp_size=1)
    assert ds["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/nvme",
                                                        "pin_memory": False}
