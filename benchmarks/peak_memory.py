"""Each rank's peak memory above its baseline, from building the model through two steps and a
checkpoint save, phase by phase, beside the model-state formula and the planner's estimate.

Runs `llmtrain train` (2 steps, the final checkpoint) at ZeRO-3 for dp 1/2/4/8, and at tp 2,
pp 2 and ep 2 (a MoE: by default 4 experts, top-1, in every layer; `--experts`, `--moe-every`),
each beside dp 2, and reads `<run_dir>/memory_rank<R>.json`
(train/memory.py: resident set on the CPU, `max_memory_allocated` on a GPU; the baseline is
read just before the model is built). Each rank runs this file (`--child`), which splits every
step at the optimizer with torch's global optimizer-step hooks: "fb" is the forward/backward of
a step (with clipping), "opt" its `optimizer.step()`. Step 1 allocates the AdamW moments inside
its optimizer step, so its forward/backward runs without them; step 2 is the steady state the
planner models. Per layout, over all ranks the largest:
  states   parameters + gradients + optimizer states the rank holds (measured shard bytes);
  layer    one transformer block's full (gathered) parameters, the target's allowance;
  init     building and initialising the model; fb1/opt1, fb2/opt2 the two steps; save the
           evaluation and the final checkpoint save;
  peak     the highest of them;
  planner  `llmtrain.planner.estimate` for the same config and layout, its per-GPU framework
           overhead set to 0 (the measured peak leaves out the process baseline), AdamW's
           kernel the one train/optim.py picks on the device (foreach on the CPU).
The model's parameters dominate (8 x d_model 512, 28M parameters, 32-token sequences, micro
batch 1, fp32). MALLOC_MMAP_THRESHOLD_ makes glibc return freed tensors to the OS, so the
resident set follows live tensors as CUDA's allocated bytes do, not glibc's retained heap.

    python benchmarks/peak_memory.py [--rows dp1 dp2 ...] [--device cpu|cuda]
                                     [--d-model 1280 --layers 14] [--experts 2 --moe-every 2]
                                     [--json OUT | --from-json IN]
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
       "train.steps": 2, "train.eval_steps": 1, "train.precision": "fp32",
       "logging.tensorboard": False, "logging.progress": False, "checkpoint.every": 0,
       "checkpoint.resume": "none", "parallel.zero_stage": 3}
MOE = {"model.moe.num_experts": 4, "model.moe.top_k": 1, "model.moe.every_n_layers": 1}
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


PHASES = ("init", "fb1", "opt1", "fb2", "opt2", "save")


def child(argv: list[str]) -> int:
    """One rank: `llmtrain train argv`, with this process's peak memory recorded before and after
    every `optimizer.step()` (torch's global optimizer hooks) to `$PEAK_PHASES_FILE.<rank>`."""
    import torch
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    from llmtrain.cli import main as llmtrain_main
    from llmtrain.train.memory import PeakMemory

    rank = int(os.environ.get("RANK", "0"))
    cuda = any(a == "train.device=cuda" for a in argv)
    peaks = PeakMemory(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda
                       else torch.device("cpu"))
    steps = [0]

    def before(optimizer, args, kwargs):
        steps[0] += 1
        peaks.mark(f"fb{steps[0]}")  # since the previous mark: the trainer's "init" or "step"

    def after(optimizer, args, kwargs):
        peaks.mark(f"opt{steps[0]}")
        Path(f"{os.environ['PEAK_PHASES_FILE']}.{rank}").write_text(json.dumps(peaks.record()))

    register_optimizer_step_pre_hook(before)
    register_optimizer_step_post_hook(after)
    return llmtrain_main(argv)


def measure(row: str, root: Path, device: str) -> list[dict]:
    """Every rank's peaks above its baseline per phase (PHASES), with its memory_rank<R>.json."""
    ranks = ROWS[row][0]
    run = root / row.replace(" ", "_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(ranks), __file__, "--child", "train",
           *[a for o in overrides(row, run, device) for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PEAK_PHASES_FILE": str(root / "phases")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
    recs = []
    for i in range(ranks):
        rec = json.loads((run / f"memory_rank{i}.json").read_text())
        split = json.loads(Path(f"{root / 'phases'}.{i}").read_text())
        # the hooks' baseline was read at process start, the trainer's before the model
        shift = split["baseline_bytes"] - rec["baseline_bytes"]
        rec["phases"] = {"init": rec["peak_bytes"]["init"], "save": rec["peak_bytes"]["save"],
                         **{k: v + shift for k, v in split["peak_bytes"].items() if k != "run"}}
        recs.append(rec)
    return recs


def config(row: str, device: str):
    from llmtrain.config import load_config
    return load_config(None, overrides(row, Path("unused"), device), world_size=ROWS[row][0])


def planned(row: str, device: str, overhead: float = 0.0) -> dict[str, float]:
    """The planner's per-GPU bytes for the row's config and layout, its framework overhead
    `overhead` bytes, with the AdamW kernel train/optim.py picks on `device`."""
    from llmtrain.planner import H100_SXM, estimate
    from llmtrain.planner.memory import GIB
    from llmtrain.planner.search import Layout
    cfg = config(row, device)
    hw = dataclasses.replace(H100_SXM, overhead_gib=overhead / GIB,
                             adamw_kernel="fused" if device == "cuda" else "foreach",
                             fsdp_overlap=device == "cuda")
    return estimate(cfg, Layout.from_config(cfg, ROWS[row][0]), hw).memory


# a model with next to nothing for the planner to count (0.2M parameters)
TINY = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 1}


def process_overhead(root: Path, device: str) -> float:
    """Bytes a rank's peak exceeds the planner's estimate by on a TINY model at dp2: what the
    process itself adds after the baseline whatever the model (on the CPU: code pages first
    touched, thread stacks, gloo's buffers; on a GPU, where only tensors are counted, ~0). The
    benchmark's analogue of the planner's per-GPU framework overhead, measured, not assumed."""
    saved = dict(MODEL)
    MODEL.update(TINY)
    try:
        recs = measure("dp2", root / "overhead", device)
        peak = max(max(r["phases"].values()) for r in recs)
        return max(0.0, peak - planned("dp2", device)["total"])
    finally:
        MODEL.update(saved)


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
    ap.add_argument("--heads", type=int, default=0, help="attention heads (default d_model/64)")
    ap.add_argument("--experts", type=int, default=MOE["model.moe.num_experts"],
                    help="experts of the ep row's MoE layers")
    ap.add_argument("--moe-every", type=int, default=1, help="every n-th layer is MoE (ep row)")
    ap.add_argument("--json", metavar="OUT", help="also write each row's measurements here")
    ap.add_argument("--from-json", metavar="IN",
                    help="measure nothing: print the table of IN (written by --json, with the "
                         "same model options) beside the current planner")
    args = ap.parse_args()
    MODEL.update({"model.d_model": args.d_model, "model.n_layers": args.layers,
                  "model.n_heads": args.heads or max(1, args.d_model // 64)})
    MOE.update({"model.moe.num_experts": args.experts, "model.moe.every_n_layers": args.moe_every})
    ROWS["ep2 dp2"] = (2, {"parallel.ep": 2, **MOE})
    mib = 2 ** 20
    saved = json.loads(Path(args.from_json).read_text()) if args.from_json else {}
    with tempfile.TemporaryDirectory() as tmp:
        overhead = saved.get("overhead") or process_overhead(Path(tmp), args.device)
        print(f"process overhead (the planner's, measured on a {TINY['model.n_layers']}-layer "
              f"d_model {TINY['model.d_model']} model at dp2): {overhead / mib:.1f} MiB",
              flush=True)
        print(f"{'layout':<8} {'ranks':>5} | {'states':>7} {'layer':>6} | "
              + " ".join(f"{k:>6}" for k in PHASES)
              + f" {'peak':>6} {'peak/(states+layer)':>19} | {'planner':>7} "
              f"{'planner/peak':>12}   (MiB, largest rank)", flush=True)
        out: dict = {"overhead": overhead, "rows": {}}
        for row in (list(saved["rows"]) if saved else args.rows):
            if saved:
                rec = saved["rows"][row]
            else:
                recs = measure(row, Path(tmp), args.device)
                rec = {"n_params": recs[0]["n_params"], "memory_kind": recs[0]["memory_kind"],
                       "states": max(r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]
                                     for r in recs),
                       "phases": {k: max(r["phases"].get(k, 0) for r in recs) for k in PHASES}}
            out["rows"][row] = rec
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))
            states, phase = rec["states"], rec["phases"]
            peak = max(phase.values())
            layer, plan = layer_bytes(row), planned(row, args.device, overhead)["total"]
            print(f"{row:<8} {ROWS[row][0]:>5} | {states / mib:7.1f} {layer / mib:6.1f} | "
                  + " ".join(f"{phase[k] / mib:6.1f}" for k in PHASES)
                  + f" {peak / mib:6.1f} {peak / (states + layer):19.3f} | {plan / mib:7.1f} "
                  f"{plan / peak:12.3f}", flush=True)
    print(f"(model: {rec['n_params']:,} parameters in the last row; memory kind "
          f"{rec['memory_kind']})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    main()
