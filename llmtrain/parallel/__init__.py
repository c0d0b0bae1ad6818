"""Everything that knows about ranks. `parallelize()` applies the techniques in a fixed order."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from llmtrain.config import Config
from llmtrain.parallel import data as _data
from llmtrain.parallel.checkpointing import apply_ac
from llmtrain.parallel.compile import apply_compile
from llmtrain.parallel.context import apply_cp
from llmtrain.parallel.expert import apply_ep, build_ep_mesh
from llmtrain.parallel.init import materialize_shards
from llmtrain.parallel.parallelized import ParallelModel
from llmtrain.parallel.tensor import apply_tp, local_tensor


def parallelize(model: nn.Module, mesh: DeviceMesh | None, cfg: Config,
                device: torch.device) -> ParallelModel:
    """Shard a model built on the meta device, then materialise and initialise this rank's part
    of it only (parallel/init.py): every layout starts from the single-process weights of
    `train.seed`, and no rank allocates more than it keeps.

    Order (docs/architecture.md): activation checkpointing, pipeline split, tensor parallel,
    context parallel, expert parallel, torch.compile per block, data parallel. The config
    validator refuses the combinations not built yet.
    """
    if cfg.parallel.activation_checkpointing != "none":
        apply_ac(model, cfg)
    seed, offload = cfg.train.seed, cfg.parallel.offload == "cpu"
    if mesh is None and cfg.parallel.engine == "torch":  # one process: nothing else to apply
        apply_compile(model, cfg)
    if mesh is None or cfg.parallel.engine == "deepspeed":
        if cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
            # left on the meta device: engines/deepspeed.py `initialize` allocates and initialises
            # each rank's DeepSpeed partitions only (in the engine, which this package cannot
            # import: the engine imports train/step.py, which imports this package)
            return ParallelModel(model)
        # one process, or DeepSpeed ZeRO 1/2, which keep every parameter whole on every rank
        # (they partition gradients and optimizer states): deepspeed.initialize wraps the
        # materialised model
        return ParallelModel(model, init_s=materialize_shards(model, device, seed))
    if mesh["pp"].size() > 1:  # pipeline split first; TP and data parallelism per stage
        # imported here: torch.distributed.pipelining imports torch._dynamo (~1 s), which
        # checkpoint loading and export (they import this package) do not need
        from llmtrain.parallel.pipeline import parallelize_pipeline
        return parallelize_pipeline(model, mesh, cfg, device)
    if mesh["tp"].size() > 1:
        apply_tp(model, mesh["tp"], cfg)
    if mesh["cp"].size() > 1:
        apply_cp(model, mesh["cp"])
    if cfg.parallel.ep > 1:
        apply_ep(model, build_ep_mesh(mesh, cfg.parallel.ep))
    apply_compile(model, cfg)
    fsdp = cfg.parallel.zero_stage >= 2
    if not fsdp:  # DDP and ZeroRedundancyOptimizer are built on materialised parameters
        init_s = materialize_shards(model, device, seed)
    module, grad_sync = _data.apply_data_parallel(model, mesh, cfg, device)
    if fsdp:
        init_s = materialize_shards(module, device, seed, params_on_cpu=offload)
    return ParallelModel(module, grad_sync, init_s=init_s)


def build_optimizer(model: nn.Module, cfg: Config,
                    mesh: DeviceMesh | None) -> torch.optim.Optimizer:
    if cfg.parallel.engine == "deepspeed":
        mesh = None  # a plain AdamW: DeepSpeed's ZeRO optimizer wraps and partitions it
    return _data.build_optimizer(model, cfg, mesh)


def get_train_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    for_load: bool = False) -> tuple[dict, dict]:
    """(model, optimizer) state dicts for DCP, whatever wraps the model or shards the states."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return (get_model_state_dict(model),
                _data.zero_state_dict(model, optimizer, init=for_load))
    return get_state_dict(model, optimizer, options=_state_dict_options(model))


def _state_dict_options(model: nn.Module):
    """Optimizer states flattened and keyed by parameter name ("state.<fqn>.exp_avg",
    "param_groups.<fqn>.lr"), as torchtitan saves them, at every layout: nested, param_groups
    are a list keyed by group index, which differs between pipeline stages (each holds only its
    own groups) and the whole model, so a checkpoint could not change layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=True)


def set_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                    optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        set_model_state_dict(model, model_sd)
        _data.load_zero_state_dict(model, optimizer, optim_sd)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=_state_dict_options(model))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, pp_group=None) -> torch.Tensor:
    """Global L2 norm of all gradients, then scale them by min(1, max_norm / (norm + 1e-6)) (as
    `torch.nn.utils.clip_grad_norm_` does on one process). A DTensor gradient contributes its
    local shard's squared norm, summed over the mesh dimensions it is sharded on; replicated
    gradients count once. One all-reduce per distinct set of sharded dimensions; with pipeline
    stages (`pp_group`), one more over the stages. The norm and the clip coefficient stay on the
    device and the gradients are always multiplied (by exactly 1 when not clipped): no host
    sync here."""
    grads = [p.grad for p in {id(p): p for p in model.parameters()}.values()
             if p.grad is not None]
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key: tuple = ()
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            key = (mesh, tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate()))
            g = g.to_local()
        buckets.setdefault(key, []).append(g.detach().float().pow(2).sum())
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for key, parts in buckets.items():
        sq = torch.stack(parts).sum()
        if key:
            mesh, dims = key
            for d in dims:
                torch.distributed.all_reduce(sq, group=mesh.get_group(d))
        total += sq
    if pp_group is not None:
        torch.distributed.all_reduce(total, group=pp_group)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:  # local shards: a DTensor's in-place op would need a DTensor coefficient
        g = g.to_local() if isinstance(g, DTensor) else g
        by_device.setdefault(g.device, []).append(g)
    for device, local in by_device.items():
        torch._foreach_mul_(local, coef.to(device))
    return norm


def _local_bytes(t: torch.Tensor) -> int:
    t = local_tensor(t)
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of model state this rank holds: parameters and gradients (local shards, tied weights
    once) and optimizer states (this rank's partition; the scalar `step` counters left out)."""
    params = {id(p): p for p in model.parameters()}.values()
    local_opt = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    opt_bytes = sum(_local_bytes(v) for s in local_opt.state.values() for k, v in s.items()
                    if isinstance(v, torch.Tensor) and k != "step")
    return {"param_bytes": sum(_local_bytes(p) for p in params),
            "grad_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optim_bytes": opt_bytes}
