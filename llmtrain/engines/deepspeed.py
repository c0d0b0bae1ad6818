"""The DeepSpeed engine (`parallel.engine: deepspeed`): ZeRO 1-3 and CPU/NVMe offload by
`deepspeed.initialize`, configured from our run config.

The DeepSpeed JSON is generated from the config (batch sizes, accumulation, clipping, bf16, ZeRO
stage, offload). A user's own JSON (`parallel.deepspeed_config`) is merged over it: the user's
values stand, ours fill only what the user left unset, and every key where the two disagree is
reported. Batch sizes are the exception: the data loader follows our config, so a disagreement
there is an error, not a warning.

The Trainer (train/loop.py) builds the model and a plain AdamW as for the torch engine, then hands
them to `initialize`. At ZeRO 1 and 2 the model arrives materialised (those stages keep every
parameter whole on every rank). At ZeRO-3 it arrives on the meta device and `init_partitions`
allocates only this rank's DeepSpeed partition of each parameter and fills it with the values
that slice has in the single-process model (model/init.py), so no rank holds a full copy of a
parameter, as `deepspeed.zero.Init` promises but without its full tensor per parameter.
`DeepSpeedStep` (the step interface of train/step.py), `save_checkpoint` and
`load_checkpoint` here replace the torch engine's when `parallel.engine: deepspeed`. Everything
else (data, evaluation, logging) is shared.

Loss normalisation: `engine.backward` divides the loss by gradient_accumulation_steps and the
gradients are averaged over dp, so each micro-batch passes sum(CE) / N_global * dp * gas; the
gradients then equal the torch engine's (see train/step.py).

Checkpoints use DeepSpeed's own format (`engine.save_checkpoint`, every rank writes its ZeRO
partition) published like train/checkpoint.py: written under `.step_<N>.tmp/`, then meta.json and
manifest.json, then renamed to `step_<N>/`, so `resume: auto` finds and verifies them. A
DeepSpeed checkpoint resumes under the DeepSpeed engine only (meta.json says `"engine":
"deepspeed"`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

import torch.distributed as dist

from llmtrain.config import Config, ConfigError
from llmtrain.config.layout import micro_batches
from llmtrain.model.init import layout_free_init
from llmtrain.model.moe import aux_loss as moe_aux_loss
from llmtrain.model.moe import moe_metrics
from llmtrain.parallel.init import materialize_shards
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.loss import reduce_step_losses
from llmtrain.train.step import (DataParallelGroup, StepResult, TrainStep, global_token_count,
                                 sample_ids, set_lr, update_router_bias)

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def generated_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload != "none":
        zero["offload_optimizer"] = {"device": p.offload, "pin_memory": False}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": p.offload, "pin_memory": False}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": micro_batches(t.global_batch_size, t.micro_batch_size,
                                                     dp_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision in ("bf16", "bf16_pure")},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.offload != "none":
        # offloaded optimizer states need DeepSpeed's own CPU Adam (a torch optimizer cannot step
        # on CPU copies of GPU parameters)
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}}
    return ds


def _merge(ours: dict, user: dict, path: str, conflicts: list[str]) -> dict:
    out = copy.deepcopy(user)
    for key, value in ours.items():
        where = f"{path}.{key}" if path else key
        if key not in user:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(user[key], dict):
            out[key] = _merge(value, user[key], where, conflicts)
        elif user[key] != value and user[key] != "auto":
            conflicts.append(f"{where}: the DeepSpeed config says {user[key]!r}, llmtrain's "
                             f"config implies {value!r}; keeping {user[key]!r}")
        elif user[key] == "auto":
            out[key] = copy.deepcopy(value)
    return out


def build_config(cfg: Config, dp_size: int) -> tuple[dict[str, Any], list[str]]:
    """(merged DeepSpeed config, conflict messages)."""
    ours = generated_config(cfg, dp_size)
    path = cfg.parallel.deepspeed_config
    if not path:
        _check_nvme(ours, path)
        return ours, []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"parallel.deepspeed_config={path!r} does not exist")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config={path!r} is not valid JSON (line {e.lineno})"
                          ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"parallel.deepspeed_config={path!r} cannot be read ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config={path!r} must hold a JSON object")
    if (user.get("checkpoint") or {}).get("load_universal"):
        # DeepSpeed reads universal checkpoints with torch.load(weights_only=False), past the
        # allow-listed loader below: a checkpoint could run code
        raise ConfigError(f"parallel.deepspeed_config={path!r} sets checkpoint.load_universal, "
                          f"which llmtrain does not allow (its loader unpickles arbitrary "
                          f"objects); remove it")
    conflicts: list[str] = []
    merged = _merge(ours, user, "", conflicts)
    for key in _BATCH_KEYS:
        if key in user and user[key] != "auto" and user[key] != ours[key]:
            raise ConfigError(f"parallel.deepspeed_config {key}={user[key]} disagrees with the run "
                              f"config ({key}={ours[key]} from train.global_batch_size, "
                              f"train.micro_batch_size and dp); remove it or set it to \"auto\"")
    _check_nvme(merged, path)
    return merged, conflicts


def _check_nvme(ds: dict[str, Any], path: str | None) -> None:
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        off = zero.get(key) or {}
        if off.get("device") == "nvme" and not off.get("nvme_path"):
            raise ConfigError(f"parallel.offload=nvme needs zero_optimization.{key}.nvme_path in "
                              f"parallel.deepspeed_config (got {path!r}): the directory on the "
                              f"NVMe drive DeepSpeed swaps to")


def initialize(model: torch.nn.Module, cfg: Config, dp_size: int, optimizer=None, log=print):
    """deepspeed.initialize with the merged config: (the engine, the seconds spent initialising
    parameters). A model still on the meta device (ZeRO-3: `parallelize` leaves it there) is
    first given this rank's partitions (`init_partitions`)."""
    import deepspeed  # optional dependency, only for parallel.engine=deepspeed

    _skip_shm_comm_op()
    ds_config, conflicts = build_config(cfg, dp_size)
    for c in conflicts:
        log(f"deepspeed config: {c}")
    if not dist.is_initialized():  # one process, no launcher: DeepSpeed still wants a group
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    init_s = 0.0
    if any(p.is_meta for p in model.parameters()):
        init_s = init_partitions(model, ds_config, cfg.train.seed)
    groups = ([{"params": g["params"], "weight_decay": g["weight_decay"]}
               for g in optimizer.param_groups] if optimizer is not None
              else [p for p in model.parameters() if p.requires_grad])
    if "optimizer" in ds_config:
        # DeepSpeed builds it (offload needs DeepSpeedCPUAdam), on our weight-decay groups
        optimizer = None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=None if optimizer is not None
                                           else groups)
    return engine, init_s


def _skip_shm_comm_op() -> None:
    """On the CPU, DeepSpeed's comm backend JIT-builds a shared-memory all-reduce op
    (deepspeed_shm_comm) when it starts: about 60 s of C++ compilation on a machine's first run
    and 2.5 s of loading in every process after that (measured here). The op serves only
    `inference_all_reduce` (DeepSpeed's inference kernels); training's collectives go through
    torch.distributed either way. Marking it incompatible in the table DeepSpeed's
    `build_shm_op` consults skips it."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_partitions(model: torch.nn.Module, ds_config: dict[str, Any], seed: int) -> float:
    """Make every parameter of a meta `model` a ZeRO-3 parameter that holds only this rank's
    partition, filled with the single-process values of `seed`; buffers are materialised whole.
    Returns the seconds it took.

    DeepSpeed's own ways (`zero.Init` around the constructor, or `zero.Init(module=...)`) start
    from a full tensor per parameter and broadcast it. Here `zero.Init` supplies the partitioning
    (the process group, the dtype, the device the partitions live on, the gather/partition
    methods: `_convert_to_deepspeed_param`), each partition is allocated as its
    `_partition_param` allocates it (deepspeed 0.19), and `layout_free_init` fills it: a
    partition is a box of the flattened tensor, so the draws need nothing else. Where the merged
    config does not partition parameters this way (a user's DeepSpeed JSON that sets another
    stage; parameters offloaded to NVMe, hpZ secondary partitions, quantized weights: DeepSpeed
    places those partitions itself), the model is materialised whole instead, as at ZeRO 1/2,
    and `deepspeed.initialize` partitions it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    start = time.perf_counter()
    _skip_shm_comm_op()  # before init_distributed starts DeepSpeed's comm backend
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3 or (zero.get("offload_param") or {}).get("device") == "nvme":
        return materialize_shards(model, torch.device(get_accelerator().current_device_name()),
                                  seed)
    deepspeed.init_distributed()  # as deepspeed.initialize does first: the config reads the world
    cut = deepspeed.zero.Init(config_dict_or_path=ds_config)  # not entered: its settings only
    if cut.zero_param_process_group is not None or cut.quantized_weights \
            or cut.quantized_nontrainable_weights:
        return materialize_shards(model, cut.local_device, seed)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    for p in params:
        cut._convert_to_deepspeed_param(p)  # reads the full shape while p is still on meta
        _allocate_partition(cut, p)
    for module in model.modules():  # rope tables, router statistics: small, kept whole
        for name, buf in module.named_buffers(recurse=False):
            setattr(module, name, torch.empty_like(buf, device=cut.local_device))
    layout_free_init(model, seed, local_box=_partition_box)
    for p in params:
        p.ds_tensor[_partition_box(p)[0].numel():].zero_()  # the last rank's padding
        # a partitioned parameter as DeepSpeed's free_param leaves it, no data of its own; a meta
        # tensor's data cannot be replaced by a real one, so the tensors are swapped, which
        # keeps the parameter object the module and the optimizer hold (its attributes go along)
        empty = torch.nn.Parameter(torch.empty(0, dtype=p.ds_tensor.dtype,
                                               device=cut.local_device), p.requires_grad)
        torch.utils.swap_tensors(p, empty)
        p.__dict__.update(empty.__dict__)
        p.ds_status = ZeroParamStatus.NOT_AVAILABLE
    # the module-level part of partitioning an existing module (memory-efficient linear,
    # buffers kept in fp32); every parameter is partitioned already, so nothing is gathered
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    return time.perf_counter() - start


def _allocate_partition(cut, p: torch.nn.Parameter) -> None:
    """This rank's partition of ZeRO-3 parameter `p`, uninitialised: ceil(numel / dp) elements
    of the partition dtype on the partition device (a persistent parameter's on the compute
    device), as `Init._partition_param` allocates it."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    size = p.aligned_size() // p.ds_zero_partition_world_size
    device = cut.local_device if p.ds_persist else cut.remote_device
    part = torch.empty(size, dtype=cut.dtype, device=device)
    if cut.pin_memory and part.device.type == "cpu":
        part = get_accelerator().pin_memory(part)
    part.requires_grad = False
    part.ds_numel, part.status, part.final_location = size, PartitionedParamStatus.AVAILABLE, None
    p.ds_tensor, p.ds_numel_aligned = part, p.aligned_size()


def _partition_box(p: torch.nn.Parameter) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(the real elements of this rank's partition, the full tensor flattened, their offset in
    it) for model/init.py: rank r of the partition group holds flat elements [r * size,
    (r + 1) * size) of the tensor padded to a multiple of the group's size."""
    size = p.ds_tensor.ds_numel
    first = size * p.ds_zero_partition_rank
    return p.ds_tensor.narrow(0, 0, max(0, min(size, p.ds_numel - first))), (p.ds_numel,), \
        (first,)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedStep(TrainStep):
    """The step under `parallel.engine: deepspeed`: the torch engine's batches, loss and learning
    rate; DeepSpeed accumulates, averages over dp, clips and steps (at the last micro-batch)."""

    def __init__(self, engine, cfg: Config, device: torch.device, dp: DataParallelGroup):
        super().__init__(engine, engine.optimizer, cfg, device, dp)
        self.engine = engine

    def __call__(self, batches: list, lr: float, measure_state: bool = False) -> StepResult:
        engine, module = self.engine, self.engine.module
        engine.train()
        set_lr(engine.optimizer, lr)
        n_global = global_token_count(batches, self.device, self.dp)
        # undo engine.backward's 1/gas and the 1/dp of the gradient average
        scale = self.dp.size * engine.gradient_accumulation_steps() / n_global
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for batch in batches:
            ce_sum, _ = self.forward_loss(batch)
            step_loss = ce_sum * scale
            aux = moe_aux_loss(module)  # the torch engine's aux / n_micro, times gas (= n_micro)
            if aux is not None:
                step_loss = step_loss + aux
                aux_sum += aux.detach() / len(batches)
            engine.backward(step_loss)
            engine.step()  # a no-op except at the gradient-accumulation boundary
            loss_sum += ce_sum.detach()
        update_router_bias(module, self.dp)
        loss, aux_mean = reduce_step_losses(loss_sum, aux_sum, n_global, self.dp.group,
                                            self.dp.size)
        norm = engine.get_global_grad_norm()  # None where DeepSpeed did not compute one (ZeRO 0)
        grad_norm = float(norm) if norm is not None else float("nan")
        # DeepSpeed has already stepped; a non-finite step is reported, not skipped (in fp32/bf16
        # it has no loss scaler that would skip it)
        finite = math.isfinite(float(loss)) and (norm is None or math.isfinite(grad_norm))
        return StepResult(float(loss), lr, grad_norm, not finite, sample_ids(batches),
                          float(aux_mean), moe_metrics(module))


def save_checkpoint(engine, cfg: Config, step: int, device: torch.device, extra: dict) -> Path:
    """DeepSpeed's checkpoint (every rank writes its partition) published as `step_<N>/` with
    meta.json (`extra` added) and a manifest, like train/checkpoint.py (collective)."""
    root = ckpt.checkpoint_dir(cfg)
    tmp, final = ckpt.begin(root, step)
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    torch.save(ckpt.rng_state(device), tmp / f"rng_rank{ckpt.rank()}.pt")
    ckpt.barrier()
    if ckpt.rank() == 0:
        extra = {"engine": "deepspeed", **extra}
        ckpt.publish(tmp, final, ckpt.make_meta(step, cfg, extra), cfg.checkpoint.keep_last)
    ckpt.barrier()
    return final


# DeepSpeed's checkpoint engine unpickles its files with `torch.load(weights_only=False)`, which
# runs whatever code a file carries. Its files hold tensors, plain containers and these classes
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 1-3 checkpoints).
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.utils.tensor_fragment.fragment_address",
                      "deepspeed.runtime.zero.config.ZeroStageEnum")


def safe_load(path, map_location=None):
    """`torch.load(weights_only=True)` admitting `_DEEPSPEED_GLOBALS` only; a file that holds
    anything else is refused in one line (ConfigError)."""
    import importlib
    import pickle
    allowed = []
    for name in _DEEPSPEED_GLOBALS:
        module, attr = name.rsplit(".", 1)
        allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            cause = next((line.strip() for line in str(e).splitlines()
                          if "GLOBAL" in line or "Unsupported" in line), "not a tensor file")
            raise ConfigError(f"checkpoint file {path} holds objects a DeepSpeed checkpoint "
                              f"does not ({cause[:160]}); refusing to load it") from None


def load_checkpoint(engine, cfg: Config, device: torch.device, path: Path) -> dict:
    """Resume the engine (module, ZeRO partitions of the optimizer) and the RNG from a checkpoint
    `save_checkpoint` wrote; returns its meta.json."""
    path = Path(path)
    meta = ckpt.read_meta(path)
    if meta.get("engine") != "deepspeed":
        raise ConfigError(f"checkpoint {path} was written by the torch engine (DCP); "
                          f"parallel.engine=deepspeed resumes DeepSpeed checkpoints only; use "
                          f"engine=torch or checkpoint.resume=none")
    ckpt.check_same_run(meta, cfg, path)
    engine.checkpoint_engine.load = safe_load  # every file DeepSpeed reads back
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {path}")
    ckpt.restore_rng(path, device)
    return meta
