"""Per-rank model-state memory at ZeRO stages 0-3, measured on the CPU (gloo) against the ZeRO
paper's formulas (Rajbhandari et al. 2020, section 5 / figure 1), for fp32 training with AdamW:
4 bytes of parameters + 4 of gradients + 8 of Adam states (m, v) per parameter Psi;
stage 1 divides the 8 by dp, stage 2 the 4 + 8, stage 3 all 16.

Measured: the local shard bytes each rank holds after its first optimizer step
(`<run_dir>/memory_rank<R>.json`, written by the training loop). Stage 2 is FSDP2 with
reshard_after_forward=False, which stores parameters sharded between steps (they are gathered
for forward and backward), so its measured parameter term is 4 Psi/dp, not the paper's 4 Psi;
the table gives both expectations for it.

    python benchmarks/memory.py            # dp = 2 and 4, stages 0-3 (about 2 minutes on 2 cores)
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


def paper_bytes(psi: int, zero: int, dp: int) -> float:
    p, g, o = 4 * psi, 4 * psi, 8 * psi
    return {0: p + g + o, 1: p + g + o / dp, 2: p + (g + o) / dp, 3: (p + g + o) / dp}[zero]


def measure(zero: int, dp: int, root: Path) -> list[dict]:
    run = root / f"zero{zero}_dp{dp}"
    sets = {**MODEL, **RUN, "parallel.zero_stage": zero, "logging.run_dir": str(run)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(dp), "-m", "llmtrain", "train", *sum((["--set", f"{k}={v}"] for k, v in
                                                      sets.items()), [])]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    if r.returncode:
        sys.exit(r.stdout[-2000:] + r.stderr[-2000:])
    return [json.loads((run / f"memory_rank{i}.json").read_text()) for i in range(dp)]


def main() -> None:
    kib = 1024
    print(f"{'dp':>3} {'zero':>4} | {'params':>8} {'grads':>8} {'optim':>8} {'total KiB':>9} | "
          f"{'paper KiB':>9} {'ratio':>6} | {'torch KiB':>9} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for dp in (2, 4):
            for zero in range(4):
                recs = measure(zero, dp, Path(tmp))
                worst = max(recs, key=lambda r: r["param_bytes"] + r["grad_bytes"]
                            + r["optim_bytes"])  # ZeRO-1 partitions are whole tensors
                psi = worst["n_params"]
                total = worst["param_bytes"] + worst["grad_bytes"] + worst["optim_bytes"]
                paper = paper_bytes(psi, zero, dp)
                torch_map = paper if zero != 2 else 16 * psi / dp  # FSDP2 shards params at rest
                print(f"{dp:>3} {zero:>4} | {worst['param_bytes'] / kib:8.1f} "
                      f"{worst['grad_bytes'] / kib:8.1f} {worst['optim_bytes'] / kib:8.1f} "
                      f"{total / kib:9.1f} | {paper / kib:9.1f} {total / paper:6.3f} | "
                      f"{torch_map / kib:9.1f} {total / torch_map:6.3f}")
    print(f"(per rank, the largest rank; Psi = {psi:,} parameters, fp32 + AdamW)")


if __name__ == "__main__":
    main()
