"""Per-rank model-state memory at ZeRO stages 0-3, measured on the CPU (gloo) against the ZeRO
paper's formulas (Rajbhandari et al. 2020, section 5 / figure 1) with AdamW.

Bytes per parameter Psi of (parameters + gradients + optimizer states), by `train.precision`:
  fp32       4 + 4 + 8    the paper's fp32 accounting
  bf16       4 + 4 + 8    autocast: the fp32 parameters are the master weights, bf16 copies
                          exist only while an op runs; the paper's mixed-precision layout
                          (2 + 2 + 12: a persistent bf16 copy beside fp32 master weights, as
                          DeepSpeed keeps) is printed beside it for comparison
  bf16_pure  2 + 2 + 4    parameters, gradients and AdamW's m, v all in bf16
Stage 1 divides the optimizer term by dp, stage 2 also the gradients, stage 3 everything.

Measured: the local shard bytes each rank holds after its first optimizer step
(`<run_dir>/memory_rank<R>.json`, written by the training loop). Stage 2 is FSDP2 with
reshard_after_forward=False, which stores parameters sharded between steps (they are gathered
for forward and backward), so its measured parameter term is P/dp, not the paper's P; the
"torch" columns give that expectation.

    python benchmarks/memory.py [--precision fp32 bf16 bf16_pure] [--dp 2 4]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = {"model.n_layers": 4, "model.d_model": 128, "model.n_heads": 4, "model.vocab_size": 1024,
         "model.max_seq_len": 64, "model.tie_embeddings": False}
RUN = {"train.seq_len": 32, "train.global_batch_size": 8, "train.micro_batch_size": 2,
       "train.steps": 1, "train.eval_steps": 1, "logging.tensorboard": False,
       "logging.progress": False, "checkpoint.every": 0, "checkpoint.resume": "none"}


BYTES = {"fp32": (4, 4, 8), "bf16": (4, 4, 8), "bf16_pure": (2, 2, 4)}
PAPER_MIXED = (2, 2, 12)


def zero_bytes(psi: int, zero: int, dp: int, layout: tuple[int, int, int],
               params_sharded_at_stage2: bool = False) -> float:
    p, g, o = (b * psi for b in layout)
    if zero == 2 and params_sharded_at_stage2:
        return (p + g + o) / dp
    return {0: p + g + o, 1: p + g + o / dp, 2: p + (g + o) / dp, 3: (p + g + o) / dp}[zero]


def measure(zero: int, dp: int, precision: str, root: Path) -> list[dict]:
    run = root / f"{precision}_zero{zero}_dp{dp}"
    sets = {**MODEL, **RUN, "parallel.zero_stage": zero, "train.precision": precision,
            "logging.run_dir": str(run)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(dp), "-m", "llmtrain", "train", *sum((["--set", f"{k}={v}"] for k, v in
                                                      sets.items()), [])]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    if r.returncode:
        sys.exit(r.stdout[-2000:] + r.stderr[-2000:])
    return [json.loads((run / f"memory_rank{i}.json").read_text()) for i in range(dp)]


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", nargs="+", default=list(BYTES), choices=list(BYTES))
    ap.add_argument("--dp", nargs="+", type=int, default=[2, 4])
    args = ap.parse_args()
    kib = 1024
    print(f"{'precision':<9} {'dp':>3} {'zero':>4} | {'params':>8} {'grads':>8} {'optim':>8} "
          f"{'total KiB':>9} | {'paper KiB':>9} {'ratio':>6} | {'torch KiB':>9} {'ratio':>6}"
          f" | {'2+2+12 KiB':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            for dp in args.dp:
                for zero in range(4):
                    recs = measure(zero, dp, precision, Path(tmp))
                    worst = max(recs, key=lambda r: r["param_bytes"] + r["grad_bytes"]
                                + r["optim_bytes"])  # ZeRO-1 partitions are whole tensors
                    psi = worst["n_params"]
                    total = worst["param_bytes"] + worst["grad_bytes"] + worst["optim_bytes"]
                    paper = zero_bytes(psi, zero, dp, BYTES[precision])
                    torch_map = zero_bytes(psi, zero, dp, BYTES[precision], True)
                    mixed = (f"{zero_bytes(psi, zero, dp, PAPER_MIXED) / kib:>10.1f} "
                             f"{total / zero_bytes(psi, zero, dp, PAPER_MIXED):>6.3f}"
                             if precision == "bf16" else f"{'-':>10} {'-':>6}")
                    print(f"{precision:<9} {dp:>3} {zero:>4} | {worst['param_bytes'] / kib:8.1f} "
                          f"{worst['grad_bytes'] / kib:8.1f} {worst['optim_bytes'] / kib:8.1f} "
                          f"{total / kib:9.1f} | {paper / kib:9.1f} {total / paper:6.3f} | "
                          f"{torch_map / kib:9.1f} {total / torch_map:6.3f} | {mixed}",
                          flush=True)
    print(f"(per rank, the largest rank; Psi = {psi:,} parameters, AdamW)")


if __name__ == "__main__":
    main()
