"""Peak memory of this rank above its baseline, per phase of a run: building and initialising the
model, the first optimizer step, a checkpoint save.

A lifetime high-water mark (`ru_maxrss`, an un-reset `max_memory_allocated`) cannot say which
phase set it, nor separate the model from what the process held before it (the interpreter,
torch, the data readers, the process groups). So the baseline is read just before the model is
built, and the high-water mark is reset at the start of every phase:

* CPU: the resident set (VmRSS, VmHWM of /proc/self/status); writing "5" to /proc/self/clear_refs
  resets VmHWM to the current VmRSS (Linux >= 4.0, Documentation/filesystems/proc.rst).
* CUDA: `torch.cuda.memory_allocated` and `max_memory_allocated` of the rank's device, reset by
  `torch.cuda.reset_peak_memory_stats`: tensors only, the allocator's cache and the CUDA context
  are not counted (the planner's "overhead" term).

`benchmarks/peak_memory.py` compares these peaks with the planner's per-GPU estimate.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{PROC_STATUS} has no {field} line; peak memory needs Linux")


def _proc_available() -> bool:
    """Whether this process can read its resident set and reset its high-water mark."""
    try:
        PROC_CLEAR_REFS.write_text("5")
        return PROC_STATUS.is_file()
    except OSError:
        return False


class PeakMemory:
    """This process's memory high-water mark above a baseline, phase by phase (module docstring).

    Made where the baseline is (before the model is built); `mark(phase)` at the end of each phase
    records the peak since the previous mark and starts the next phase.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        # without /proc (macOS) or where clear_refs is not writable, nothing is measured
        self.available = self.cuda or _proc_available()
        self.baseline_bytes = self._current() if self.available else 0
        self.peak_bytes: dict[str, int] = {}  # phase -> peak above the baseline
        self._reset()

    def _current(self) -> int:
        return (torch.cuda.memory_allocated(self.device) if self.cuda
                else _status_bytes("VmRSS"))

    def _high_water(self) -> int:
        return (torch.cuda.max_memory_allocated(self.device) if self.cuda
                else _status_bytes("VmHWM"))

    def _reset(self) -> None:
        if not self.available:
            return
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            PROC_CLEAR_REFS.write_text("5")

    def mark(self, phase: str) -> None:
        """End `phase`: keep its peak above the baseline (the largest, if marked again)."""
        if not self.available:
            return
        peak = self._high_water() - self.baseline_bytes
        self.peak_bytes[phase] = max(self.peak_bytes.get(phase, peak), peak)
        self._reset()

    def record(self) -> dict:
        """The fields `memory_rank<R>.json` gets: the baseline, each phase's peak above it and
        the largest of them (`peak_bytes["run"]`)."""
        if not self.available:
            return {"memory_kind": "unavailable"}
        return {"memory_kind": "cuda_allocated" if self.cuda else "rss",
                "baseline_bytes": self.baseline_bytes,
                "peak_bytes": {**self.peak_bytes, "run": max(self.peak_bytes.values(),
                                                             default=0)}}
