"""Checkpoints in `torch.distributed.checkpoint` (DCP) format, published atomically.

Layout of `<dir>/step_<N>/`: DCP's `.metadata` and `__<rank>_0.distcp` shards (model and optimizer,
resharded on load by DCP), `rng_rank<R>.pt` (tensors only, loaded with `weights_only=True`) and
`meta.json` (step, tokens, config hash, layout, versions). Every rank writes into
`.step_<N>.tmp/`; rank 0 renames it to `step_<N>/` after all ranks finished, so a directory named
`step_<N>` is always complete. The data position is the step (see data/loader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llmtrain.config import Config, ConfigError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def config_hash(cfg: Config) -> str:
    """Hash of what makes two runs the same model and data (not steps, logging or checkpointing)."""
    d = cfg.to_dict()
    ident = {k: d[k] for k in ("model", "data")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(path_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         cfg: Config, device: torch.device, extra: dict, keep_last: int = 0) -> Path:
    """Write checkpoint `step_<step>` under `path_root` (collective: every rank calls it)."""
    final = path_root / f"step_{step}"
    tmp = path_root / f".step_{step}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(device), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        meta = {"step": step, "config_hash": config_hash(cfg), "time": time.time(),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "layout": {k: getattr(cfg.parallel, k) for k in
                           ("dp_replicate", "dp_shard", "tp", "pp", "ep", "zero_stage")},
                "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
                **extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(path_root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def find_resume(cfg: Config) -> Path | None:
    r = cfg.checkpoint.resume
    if r == "none":
        return None
    if r != "auto":
        return Path(r)
    found = list_checkpoints(checkpoint_dir(cfg))
    return found[-1] if found else None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
         device: torch.device) -> dict:
    """Load model, optimizer and RNG state in place; returns meta.json."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise ConfigError(f"checkpoint {path} is incomplete: {meta_file} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("config_hash") != config_hash(cfg):
        raise ConfigError(f"checkpoint {path} was written by a run with different model or data "
                          f"settings (config hash {meta.get('config_hash')} != "
                          f"{config_hash(cfg)}); use checkpoint.resume=none to start afresh")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    return meta

