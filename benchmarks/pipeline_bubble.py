"""Pipeline bubble of torch.distributed.pipelining's schedules, measured against the textbook.

p = 4 processes (gloo, CPU), one stage per process (two for the interleaved schedules), each
stage of known cost: it sleeps t_F in the forward, t_B in the input-gradient backward and t_W in
the weight-gradient backward (t_F = t_B = t_W, so a full backward costs 2 t_F as for a matmul).
Sleeping keeps the cost exact on a shared 2-core machine. With m micro-batches the ideal step
(no bubble) takes m (t_F + t_B + t_W) per process; the measured bubble fraction is
1 - ideal / measured. Textbook fractions of the step:
  gpipe, 1f1b       (p - 1) / (m + p - 1)                 (Huang et al. 2019; Narayanan et al. 2021)
  interleaved (v)   (p - 1) / (v m + p - 1)               (Narayanan et al. 2021, section 2.2)
  zero bubble H1    (p - 1) / 3 / (m + (p - 1) / 3)       (Qi et al. 2023: bubble (p-1)(t_F+t_B-t_W))
Run: python benchmarks/pipeline_bubble.py [--t-ms 10] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import queue
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

P = 4
MICROBATCHES = (4, 8, 16)
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1))


class _Sleep(torch.autograd.Function):
    """Identity that sleeps `fwd` s in the forward and `bwd` s in the backward."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        ctx.bwd = bwd
        time.sleep(fwd)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.bwd)
        return grad.contiguous(), None, None  # y.sum()'s gradient is an expanded view


class SleepStage(nn.Module):
    """out = sleep(x) + w: the input gradient runs through the x path (t_B), the weight
    gradient through the w path (t_W), so a zero-bubble schedule can run them apart."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t
        self.w = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return _Sleep.apply(x, self.t, self.t) + _Sleep.apply(self.w, 0.0, self.t)


def textbook(schedule: str, m: int, v: int) -> float:
    if schedule == "interleaved_1f1b":
        return (P - 1) / (v * m + P - 1)
    if schedule == "zero_bubble":
        return (P - 1) / 3 / (m + (P - 1) / 3)
    return (P - 1) / (m + P - 1)


def _worker(rank: int, t: float, steps: int, port: int, out) -> None:
    from torch.distributed.pipelining import PipelineStage

    from llmtrain.parallel.pipeline import _SCHEDULES, _MULTI_STAGE
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=P)
    rows = []
    for m in MICROBATCHES:
        for name, v in SCHEDULES:
            n_stages = P * v
            stages = [PipelineStage(SleepStage(t / v), rank + i * P, n_stages, torch.device("cpu"))
                      for i in range(v)]
            cls = _SCHEDULES[name]
            sched = cls(stages if name in _MULTI_STAGE else stages[0], n_microbatches=m,
                        loss_fn=lambda y, _: y.sum(), scale_grads=False)
            x = torch.zeros(m, 8)
            times = []
            for i in range(steps + 1):  # the first step infers shapes: not timed
                dist.barrier()
                t0 = time.perf_counter()
                args = (x,) if rank == 0 else ()
                kwargs = {"target": x} if rank == (n_stages - 1) % P else {}
                sched.step(*args, **kwargs)
                dist.barrier()
                if i:
                    times.append(time.perf_counter() - t0)
            step = sorted(times)[len(times) // 2]
            ideal = m * 3 * t
            rows.append((name, v, m, step, 1 - ideal / step, textbook(name, m, v)))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t-ms", type=float, default=10.0, help="t_F = t_B = t_W per stage (ms)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per cell (median)")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_worker, args=(r, a.t_ms / 1000, a.steps, port, q))
             for r in range(P)]
    for pr in procs:
        pr.start()
    rows = None
    while rows is None:  # stop at once if a worker died instead of waiting on the queue
        try:
            rows = q.get(timeout=5)
        except queue.Empty:
            if any(pr.exitcode not in (None, 0) for pr in procs):
                for pr in procs:
                    pr.kill()
                raise SystemExit("a pipeline worker failed; see its traceback above")
    for pr in procs:
        pr.join(timeout=60)
    print(f"p={P} stages, t_F=t_B=t_W={a.t_ms:g} ms per stage; ideal step = m x "
          f"{3 * a.t_ms:g} ms")
    print(f"{'schedule':<18}{'v':>2}{'m':>4}{'step ms':>10}{'ideal ms':>10}"
          f"{'bubble measured':>17}{'textbook':>10}")
    for name, v, m, step, bubble, book in rows:
        print(f"{name:<18}{v:>2}{m:>4}{step * 1e3:>10.1f}{m * 3 * a.t_ms:>10.1f}"
              f"{bubble:>17.3f}{book:>10.3f}")


if __name__ == "__main__":
    main()
