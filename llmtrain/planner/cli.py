"""`llmtrain plan CONFIG --gpus N`: rank parallel layouts by estimated step time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llmtrain.config import (Config, ConfigError, apply_override, config_from_dict, load_config,
                             parse_override, read_yaml_file)
from llmtrain.planner.compute import H100_SXM, Hardware
from llmtrain.planner.memory import GIB
from llmtrain.planner.search import Estimate, plan

# validate() refuses everything but plain data parallel until the parallel code lands; the
# planner validates the rest of the config with these reset, then reads the real values back.
_NEUTRAL = ("parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.cp=1",
            "parallel.zero_stage=0", "parallel.engine=torch", "parallel.dp_replicate=1",
            "parallel.dp_shard=-1", "parallel.virtual_stages=1", "train.micro_batch_size=1",
            "model.moe.num_experts=0")


def load_run(path: str | Path, overrides: list[str] = ()) -> Config:
    """The config at `path` with `overrides`, validated except for its parallel layout (which
    `search.check_layout` judges) and MoE (which the planner models before the trainer runs it)."""
    load_config(path, [*overrides, *_NEUTRAL])  # file, YAML, types, ranges, model/train rules
    data: dict[str, Any] = read_yaml_file(path) or {}
    for item in overrides:
        apply_override(data, *parse_override(item))
    cfg = config_from_dict(data)
    moe = cfg.model.moe
    if moe.num_experts and moe.top_k > moe.num_experts:
        raise ConfigError(f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts="
                          f"{moe.num_experts}")
    return cfg


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="estimate memory and step time of parallel layouts; print the best",
        description="Enumerate the parallel layouts of CONFIG's run on --gpus GPUs, estimate "
                    "per-GPU memory and step time of each (see docs/planner.md for the formulas "
                    "and assumptions), print the fastest that fit as a table and the best as "
                    "--set overrides.")
    d = H100_SXM
    p.add_argument("config", help="run config YAML")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--gpu-mem-gib", type=float, default=d.gpu_mem_gib)
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="dense bf16 peak per GPU (default: H100 SXM)")
    p.add_argument("--nvlink-gbps", type=float, default=d.nvlink_gbps,
                   help="intra-node bandwidth per GPU per direction, GB/s (gigabytes)")
    p.add_argument("--net-gbps", type=float, default=d.net_gbps,
                   help="inter-node bandwidth per GPU per direction, GB/s (gigabytes)")
    p.add_argument("--hbm-gbps", type=float, default=d.hbm_gbps, help="GPU memory bandwidth, GB/s")
    p.add_argument("--top", type=int, default=5, help="rows to print")
    p.add_argument("--json", metavar="OUT", help="write every ranked layout to this JSON file")
    p.add_argument("--layout", choices=("search", "fixed"), default="search",
                   help="fixed: evaluate only the layout CONFIG sets")
    p.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    p.add_argument("--attention", choices=("flash", "math"), default="flash",
                   help="flash: fused SDPA kernels store no s x s scores (our default on GPU); "
                        "math: Korthikanti's accounting with stored scores")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable")
    p.set_defaults(func=run)


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    for name in ("gpus_per_node", "gpu_mem_gib", "peak_tflops", "nvlink_gbps", "net_gbps",
                 "hbm_gbps"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    return Hardware(gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gib,
                    peak_tflops=args.peak_tflops, nvlink_gbps=args.nvlink_gbps,
                    net_gbps=args.net_gbps, hbm_gbps=args.hbm_gbps)


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise ConfigError(f"--gpus={args.gpus} must be at least 1")
    if args.top < 1:
        raise ConfigError(f"--top={args.top} must be at least 1")
    hw = hardware_from_args(args)
    cfg = load_run(args.config, args.overrides)
    ests = plan(cfg, args.gpus, hw, fixed=args.layout == "fixed", engine=args.engine,
                flash=args.attention == "flash")
    fitting = [e for e in ests if e.fits]
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"config": str(args.config), "gpus": args.gpus, "hardware": hw.to_dict(),
             "attention": args.attention, "layouts": [e.to_json() for e in ests]}, indent=1))
    shown = (fitting or ests)[:args.top]
    if not fitting:
        print(f"no layout fits in {hw.gpu_mem_gib:g} GiB per GPU; showing the smallest")
    print(format_table(shown))
    best = shown[0]
    if best.fits:
        print("\nbest layout as overrides:\n  " + " ".join(f"--set {o}"
                                                         for o in best.layout.overrides()))
    return 0


_COLUMNS = ("tp", "pp", "dp_r", "dp_s", "ep", "cp", "zero", "schedule", "m", "mbs", "ckpt", "sp",
            "mem_GiB", "step_s", "tok/s", "MFU", "TFLOP/s")


def format_table(ests: list[Estimate]) -> str:
    rows = [_COLUMNS]
    for e in ests:
        lay = e.layout
        sched = lay.pp_schedule + (f"/v{lay.virtual_stages}" if lay.virtual_stages > 1 else "")
        rows.append((str(lay.tp), str(lay.pp), str(lay.dp_replicate), str(lay.dp_shard),
                     str(lay.ep), str(lay.cp), str(lay.zero_stage), sched if lay.pp > 1 else "-",
                     str(lay.pp_microbatches), str(lay.micro_batch_size),
                     lay.activation_checkpointing, "y" if lay.sequence_parallel else "n",
                     f"{e.memory['total'] / GIB:.1f}", f"{e.step_time_s:.3g}",
                     f"{e.tokens_per_s:,.0f}", f"{e.mfu:.1%}", f"{e.tflops_per_gpu:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
