"""Each rank's peak memory above its baseline, from building the model through the first step and
a checkpoint save, beside the model-state formula and the planner's estimate.

Runs `llmtrain train` (1 step, the final checkpoint) at ZeRO-3 for dp 1/2/4/8, and at tp 2,
pp 2 and ep 2 (a 4-expert MoE), each beside dp 2, and reads `<run_dir>/memory_rank<R>.json`
(train/memory.py: resident set on the CPU, `max_memory_allocated` on a GPU; the baseline is
read just before the model is built). Per layout, over all ranks the largest:
  states   parameters + gradients + optimizer states the rank holds (measured shard bytes);
  layer    one transformer block's full (gathered) parameters, the target's allowance;
  peak     the highest resident set above the baseline, and the phase that reached it;
  planner  `llmtrain.planner.estimate` for the same config and layout, its per-GPU framework
           overhead set to 0 (the measured peak leaves out the process baseline).
The model's parameters dominate (8 x d_model 512, 28M parameters, 32-token sequences, micro
batch 1, fp32). MALLOC_MMAP_THRESHOLD_ makes glibc return freed tensors to the OS, so the
resident set follows live tensors as CUDA's allocated bytes do, not glibc's retained heap.

    python benchmarks/peak_memory.py [--rows dp1 dp2 ...] [--device cpu|cuda]
                                     [--d-model 1280 --layers 14]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = {"model.n_layers": 8, "model.d_model": 512, "model.n_heads": 8, "model.vocab_size": 1024,
         "model.max_seq_len": 32, "model.tie_embeddings": False}
RUN = {"train.seq_len": 32, "train.global_batch_size": 8, "train.micro_batch_size": 1,
       "train.steps": 1, "train.eval_steps": 1, "train.precision": "fp32",
       "logging.tensorboard": False, "logging.progress": False, "checkpoint.every": 0,
       "checkpoint.resume": "none", "parallel.zero_stage": 3}
MOE = {"model.moe.num_experts": 4, "model.moe.top_k": 1}
# name -> (ranks, overrides)
ROWS = {
    "dp1": (1, {}), "dp2": (2, {}), "dp4": (4, {}), "dp8": (8, {}),
    "tp2 dp2": (4, {"parallel.tp": 2}),
    "pp2 dp2": (4, {"parallel.pp": 2}),
    "ep2 dp2": (2, {"parallel.ep": 2, **MOE}),
}


def overrides(row: str, run_dir: Path, device: str) -> list[str]:
    sets = {**MODEL, **RUN, **ROWS[row][1], "train.device": device, "logging.run_dir": run_dir}
    return [f"{k}={v}" for k, v in sets.items()]


def measure(row: str, root: Path, device: str) -> list[dict]:
    """Every rank's memory_rank<R>.json of the run of `row`."""
    ranks = ROWS[row][0]
    run = root / row.replace(" ", "_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(ranks), "-m", "llmtrain", "train",
           *[a for o in overrides(row, run, device) for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
    return [json.loads((run / f"memory_rank{i}.json").read_text()) for i in range(ranks)]


def config(row: str, device: str):
    from llmtrain.config import load_config
    return load_config(None, overrides(row, Path("unused"), device), world_size=ROWS[row][0])


def planned(row: str, device: str) -> dict[str, float]:
    """The planner's per-GPU bytes for the row's config and layout, without its framework
    overhead."""
    from llmtrain.planner import H100_SXM, estimate
    from llmtrain.planner.search import Layout
    cfg = config(row, device)
    hw = dataclasses.replace(H100_SXM, overhead_gib=0.0)
    return estimate(cfg, Layout.from_config(cfg, ROWS[row][0]), hw).memory


def layer_bytes(row: str) -> float:
    """One block's parameters as this rank gathers them (its tp and ep share, fp32): what
    ZeRO-3 gathers at a time."""
    from llmtrain.planner.memory import param_counts
    cfg = config(row, "cpu")
    p, pc = cfg.parallel, param_counts(cfg.model)
    experts = pc.moe_layer_experts / p.ep - pc.mlp + pc.router if pc.n_moe_layers else 0
    return 4 * (pc.dense_layer / p.tp + experts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--d-model", type=int, default=MODEL["model.d_model"],
                    help="another model width (heads of 64), e.g. 1280 with --layers 14: 276M "
                         "parameters, the issue's 'about 270M'")
    ap.add_argument("--layers", type=int, default=MODEL["model.n_layers"])
    args = ap.parse_args()
    MODEL.update({"model.d_model": args.d_model, "model.n_layers": args.layers,
                  "model.n_heads": max(1, args.d_model // 64)})
    mib = 2 ** 20
    print(f"{'layout':<8} {'ranks':>5} | {'states':>7} {'layer':>6} | {'init':>6} {'step':>6} "
          f"{'save':>6} {'peak':>6} {'peak/(states+layer)':>19} | {'planner':>7} "
          f"{'planner/peak':>12}   (MiB, largest rank)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows:
            recs = measure(row, Path(tmp), args.device)
            states = max(r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] for r in recs)
            phase = {k: max(r["peak_bytes"][k] for r in recs) for k in ("init", "step", "save")}
            peak = max(phase.values())
            layer, plan = layer_bytes(row), planned(row, args.device)["total"]
            print(f"{row:<8} {ROWS[row][0]:>5} | {states / mib:7.1f} {layer / mib:6.1f} | "
                  f"{phase['init'] / mib:6.1f} {phase['step'] / mib:6.1f} "
                  f"{phase['save'] / mib:6.1f} {peak / mib:6.1f} "
                  f"{peak / (states + layer):19.3f} | {plan / mib:7.1f} {plan / peak:12.3f}",
                  flush=True)
    print(f"(model: {recs[0]['n_params']:,} parameters in the last row; memory kind "
          f"{recs[0]['memory_kind']})")


if __name__ == "__main__":
    main()
