"""What a run reports: metrics.jsonl, eval.jsonl, TensorBoard scalars, a progress bar, peak memory.

Only rank 0 writes, through `RunDir` (a full disk stops the run in one line). A resumed run drops
the lines of steps after its checkpoint, and any damaged line, before appending, so every step
appears exactly once in the files.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from llmtrain.train.rundir import RunDir

# bf16 dense peak of one H100 SXM (TFLOP/s), the denominator of MFU as PaLM and torchtitan use it.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux: the process's resident high-water mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def _truncate_after(path: Path, step: int, warn) -> list[str] | None:
    """The lines of `path` whose step <= `step` (a resumed run rewrites what came after), or
    None if that is every line. A line that is not a JSON object (half written when the disk
    filled or the process was killed) is dropped with a warning instead of making the run
    unresumable."""
    if not path.exists():
        return None
    kept, bad, lines = [], [], 0
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), int):
                raise ValueError
        except ValueError:
            bad.append(n)
            continue
        if rec.get("step", 0) <= step:
            kept.append(line)
    if bad:
        warn(f"warning: {path}: dropped {len(bad)} damaged line(s) (line {bad[0]}"
             f"{' ...' if len(bad) > 1 else ''}; a write cut short by a full disk or a kill)")
    return None if len(kept) == lines else kept


class MetricsWriter:
    def __init__(self, run_dir: RunDir, enabled: bool, tensorboard: bool, jsonl: bool,
                 progress: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.run_dir = run_dir
        self.files = {}
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if jsonl:
            for name in ("metrics", "eval"):
                kept = _truncate_after(run_dir.path / f"{name}.jsonl", start_step, self.message)
                if kept is not None:  # rewritten only when lines go (a full disk needs no room)
                    run_dir.write_text(f"{name}.jsonl", "".join(line + "\n" for line in kept))
                with run_dir.writing(f"{name}.jsonl") as path:
                    self.files[name] = path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            with run_dir.writing("tb") as path:
                self.tb = SummaryWriter(str(path), purge_step=start_step + 1)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, kind: str, record: dict, histograms: dict | None = None) -> None:
        if not self.enabled:
            return
        f = self.files.get(kind)
        if f is not None:
            with self.run_dir.writing(f"{kind}.jsonl"):
                f.write(json.dumps(record) + "\n")
                f.flush()
        if self.tb is not None:
            step = record["step"]
            prefix = "train" if kind == "metrics" else "eval"
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
            for k, v in (histograms or {}).items():
                self.tb.add_histogram(f"{prefix}/{k}", v, step)

    def progress(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:  # its flush failed: log() already raised the RunError for it
                pass
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
