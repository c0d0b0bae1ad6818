"""Process-group set-up and the DeviceMesh, from ParallelConfig and the launcher's environment.

Launchers tell a process who it is through environment variables: torchrun and the deepspeed
launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under Slurm without them we
read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. The mesh is `pp x dp_replicate x dp_shard x cp x tp`,
outermost first (torchtitan's order), so tp groups are the closest ranks (same node).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llmtrain.config import Config, ConfigError, ParallelDims
from llmtrain.config.layout import DistEnv
from llmtrain.train.rundir import RunError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def resolve_device(cfg: Config, env: DistEnv) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        dev = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def mesh_shape(cfg: Config, world_size: int) -> dict[str, int]:
    """The size of each of MESH_DIMS (a ConfigError where they do not fit `world_size`)."""
    dims = ParallelDims.from_config(cfg, world_size)
    return {name: getattr(dims, name) for name in MESH_DIMS}


def restart_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store | None:
    """The launcher's store with this restart's own key prefix, under a torchrun agent; else None.

    torchrun's agent keeps one TCPStore for the whole job (TORCHELASTIC_USE_AGENT_STORE) and the
    process groups' keys carry no restart number, so after `--max-restarts` restarts the workers a
    worker that joins late can read a dead worker's address from the round before and time out
    dialling it (gloo's "connectFullMesh failed"); one failed round then fails every later one the
    same way. A prefix per restart keeps each round's keys apart.
    """
    environ = os.environ
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), env.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"llmtrain/restart_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                            store)


def init_distributed(cfg: Config, env: DistEnv, device: torch.device) -> DeviceMesh | None:
    """Join the process group (NCCL on CUDA, gloo on CPU) and build the mesh; None for 1 process."""
    if env.world_size == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=cfg.train.collective_timeout_s)
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=timeout, store=restart_store(env, timeout))
    shape = mesh_shape(cfg, env.world_size)
    return init_device_mesh(device.type, tuple(shape.values()), mesh_dim_names=MESH_DIMS)


def dp_info(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(rank, size) of this process in the flattened data-parallel dimension."""
    if mesh is None:
        return 0, 1
    rep, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return (rep.get_local_rank() * shard.size() + shard.get_local_rank(),
            rep.size() * shard.size())


def cp_info(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(rank, size) of this process in its context-parallel group: the ranks that read the same
    sequences and each keep a contiguous 1/cp of them (data/loader.py)."""
    if mesh is None:
        return 0, 1
    return mesh["cp"].get_local_rank(), mesh["cp"].size()


def describe_groups(mesh: DeviceMesh | None) -> list[str]:
    """One line per mesh dimension: which global ranks form each group."""
    if mesh is None:
        return ["single process"]
    ranks = mesh.mesh
    lines = []
    for i, name in enumerate(MESH_DIMS):
        if ranks.shape[i] == 1:
            continue
        groups = ranks.movedim(i, -1).reshape(-1, ranks.shape[i]).tolist()
        lines.append(f"{name}={ranks.shape[i]}: " + " ".join(str(g) for g in groups))
    return lines or ["every dimension 1"]


def on_rank0_then_agree(do) -> None:
    """`do()` on global rank 0 only; if it raises a ConfigError or RunError, every rank raises
    the same one. Otherwise the other ranks would go on into the next collective and fail there
    on rank 0's exit with a gloo/NCCL traceback that hides the one-line reason. The error is
    marked `same_on_every_rank`: rank 0 prints it, the others exit silently (cli.main). Any
    other exception is rank 0's own traceback; the others stop quietly with it."""
    if not dist.is_initialized():
        do()
        return
    error = None
    if dist.get_rank() == 0:
        try:
            do()
        except (ConfigError, RunError) as e:
            error = (type(e).__name__, str(e))
        except BaseException as e:
            dist.broadcast_object_list([("RunError", f"rank 0 failed: {type(e).__name__}: {e}")],
                                       src=0)
            raise
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        kind, message = box[0]
        e = (ConfigError if kind == "ConfigError" else RunError)(message)
        e.same_on_every_rank = True
        raise e
