"""What `parallelize()` returns: this rank's module and what a training step must know about how
it was split. Explicit fields instead of attributes written into the module and read back by name
elsewhere, so the contract between `parallel/` and the step (train/step.py) is visible here."""

from __future__ import annotations

import dataclasses

from torch import nn

# One gradient reduction the step runs where no DDP/FSDP wrapper does it (tensor parallelism at
# ZeRO 0/1: DTensor parameters; expert parallelism: expert weights that differ between ranks;
# pipeline stages): (parameters, process group, divisor), each gradient summed over the group
# and divided by the divisor. parallel/data.py `GradReducer` runs a plan: overlapped with the
# last micro-batch's backward (TrainStep), or after the schedule's backward (PipelineStep).
GradSync = tuple[list[nn.Parameter], object, int]


@dataclasses.dataclass
class ParallelModel:
    module: nn.Module
    """Every parameter this rank holds, under the whole model's parameter names (FQNs), wrapped
    by DDP/FSDP where they apply: what the optimizer and checkpoints see."""
    grad_sync: list[GradSync] = dataclasses.field(default_factory=list)
    """The reductions the step runs (GradReducer; empty where a wrapper reduces)."""
    parts: list[nn.Module] = dataclasses.field(default_factory=list)
    """Pipeline parallelism: this rank's stage modules (sharing `module`'s parameters)."""
    stage_ids: list[int] = dataclasses.field(default_factory=list)
    """Pipeline parallelism: the stage index of each of `parts`."""
    pp_group: object | None = None
    """Pipeline parallelism: the pp process group (the gradient norm sums over every stage)."""
    init_s: float = 0.0
    """Seconds this rank spent initialising its parameters (parallel/init.py)."""
