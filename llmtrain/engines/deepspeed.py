"""The DeepSpeed engine (`parallel.engine: deepspeed`): ZeRO 1-3 and CPU/NVMe offload by
`deepspeed.initialize`, configured from our run config.

The DeepSpeed JSON is generated from the config (batch sizes, accumulation, clipping, bf16, ZeRO
stage, offload). A user's own JSON (`parallel.deepspeed_config`) is merged over it: the user's
values stand, ours fill only what the user left unset, and every key where the two disagree is
reported. Batch sizes are the exception: the data loader follows our config, so a disagreement
there is an error, not a warning.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import Config, ConfigError

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
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
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
        return ours, []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"parallel.deepspeed_config={path!r} does not exist")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config={path!r} is not valid JSON (line {e.lineno})"
                          ) from None
    conflicts: list[str] = []
    merged = _merge(ours, user, "", conflicts)
    for key in _BATCH_KEYS:
        if key in user and user[key] != "auto" and user[key] != ours[key]:
            raise ConfigError(f"parallel.deepspeed_config {key}={user[key]} disagrees with the run "
                              f"config ({key}={ours[key]} from train.global_batch_size, "
                              f"train.micro_batch_size and dp); remove it or set it to \"auto\"")
    return merged, conflicts


def initialize(model: torch.nn.Module, cfg: Config, dp_size: int, optimizer=None, log=print):
    """deepspeed.initialize with the merged config; returns the engine."""
    import deepspeed

    ds_config, conflicts = build_config(cfg, dp_size)
    for c in conflicts:
        log(f"deepspeed config: {c}")
    if "optimizer" in ds_config:
        optimizer = None  # DeepSpeed builds it (offload needs DeepSpeedCPUAdam)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=None if optimizer is not None
                                           else [p for p in model.parameters()
                                                 if p.requires_grad])
    return engine
