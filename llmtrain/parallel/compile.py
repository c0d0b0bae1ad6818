"""`parallel.compile: true`: torch.compile (inductor) per transformer block, applied from outside
the model after tensor/expert parallelism and activation checkpointing, before data parallelism
(torchtitan's place for it).

Per block, not the whole model: the blocks of a stack run the same code on the same shapes, so
dynamo traces one graph and every layer reuses it (compile time does not grow with depth), and
the wrappers that act between blocks (FSDP2's all-gathers and reduce-scatters, DDP's bucketed
reductions, the pipeline's stage boundaries) stay outside the compiled code, where they were
built to run. Each block's `forward` is replaced in place, as `apply_ac` does, so parameter
names (FQNs), checkpoints and the wrappers' module hooks are unchanged; with activation
checkpointing the checkpoint call is inside the compiled function, which dynamo turns into its
checkpoint higher-order op (full, or with the selective policy's saved ops). Static shapes
(`dynamic=False`): a training run feeds every block the same shapes; a new shape compiles a graph
of its own (which CompileClock reports) instead of turning the first one shape-generic.

Dense blocks compile as one graph (`fullgraph=True`: a graph break there is a bug, and fails
loudly instead of running slower). In MoE blocks the token dispatch stays eager; these graph
breaks remain (torch._dynamo.explain on a top-2 MoE block, torch 2.13), dynamo compiles the
router, the gate weighting, the combine and the rest of the block between them:
  - `torch.bincount` of the chosen experts (the counts per expert): its output length depends on
    the data (aten.bincount is a dynamic-shape operator);
  - the capacity cut `order[rank_in_expert < cap]`: a boolean mask (aten.nonzero), whose output
    length depends on the routing;
  - the experts themselves (`GroupedExperts.forward`, under expert parallelism its all-to-alls),
    run eagerly by `torch.compiler.disable`: they read `counts.tolist()` for their splits, and
    `torch._grouped_mm`'s meta function accepts only bf16 while its CPU kernel runs fp32, so
    the traced call fails where the eager one works.

The loss (`train/loss.py` `cross_entropy_sum`) is compiled where the step that computes it asks
for it (`compiled_loss`: the pipeline's last stage).

Tensor parallelism: the DTensor plans of parallel/tensor.py are applied first, so dynamo traces
each block with its plan's hooks (the DTensor redistributions inside the block are in its graph);
the embedding, final norm and output layer stay eager, and the loss-parallel cross entropy is
compiled on its own (`compiled_loss`, with the vocab-sharded DTensor logits as its input).
A block's input can be an AsyncCollectiveTensor (the embedding's async all-reduce, or under
sequence parallelism reduce-scatter): `run` waits on it first (the comment there says why).

Not supported (the config validator refuses them): the deepspeed engine (it wraps the model in
its own engine, outside parallelize's torch path) and MoE blocks under tensor parallelism (not
run compiled; see validate.py).

torch.compile is lazy: the graphs are built in the first forward and backward. `CompileClock`
prints how much longer the first optimizer step took than the second (the compile time) and
warns about any later training step that compiled a graph (a recompilation).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor, wait_tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._pytree import tree_map_only

from llmtrain.config import Config
from llmtrain.model.moe import moe_layers
from llmtrain.parallel.data import transformer_blocks


def apply_compile(model: nn.Module, cfg: Config,
                  log: Callable[[str], None] | None = print) -> None:
    """torch.compile the forward of every transformer block of `model` (decoder, encoder and
    decoder stacks; a pipeline stage's own blocks), in place; `log` gets CompileClock's lines
    (None: no clock, for a caller that times the steps itself)."""
    if not cfg.parallel.compile:
        return
    for block in transformer_blocks(model):
        moes = moe_layers(block).values()
        for moe in moes:  # the experts' dispatch stays eager (module docstring)
            moe.experts.forward = torch.compiler.disable(moe.experts.forward)
        block.forward = _compiled(block.forward, fullgraph=not moes)
    if log is not None:
        CompileClock.start(log)


def _compiled(forward, fullgraph: bool):
    # A plain function around the forward: with activation checkpointing `forward` is a
    # functools.partial of `checkpoint`, which dynamo inlines as its checkpoint op when it is
    # called from traced code (and would skip if it were the compiled frame itself).
    def block_forward(*args, **kwargs):
        return forward(*args, **kwargs)
    compiled = torch.compile(block_forward, fullgraph=fullgraph, dynamic=False)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        CompileClock.forward_ran()
        # Tensor parallelism: the block's input can be an AsyncCollectiveTensor (the embedding's
        # RowwiseParallel all-reduces, or under SP reduce-scatters, with async_op=True). AOT
        # autograd on torch 2.13 replaces such an input by its waited inner tensor, which does
        # not require grad, so the compiled backward returns no gradient for it: the embedding
        # then gets none (the eager redistribute's backward fails on the zeros autograd puts in
        # its place, "'Tensor' object has no attribute '_local_tensor'"). Waiting here hands the
        # graph a plain tensor that keeps its autograd history (`_Waited`: funcol's wait_tensor
        # has an identity backward only on recent torch; on older ones it cuts the gradient).
        args, kwargs = tree_map_only(AsyncCollectiveTensor, _Waited.apply, (args, kwargs))
        return compiled(*args, **kwargs)
    return run


class _Waited(torch.autograd.Function):
    """An AsyncCollectiveTensor waited on: the collective's result as a plain tensor, with the
    gradient passed through unchanged (waiting does not change the values)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return wait_tensor(t).clone()  # a tensor of its own, not an alias of the input

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def compiled_loss(cfg: Config, loss_fn):
    """`loss_fn` compiled when parallel.compile is on, else `loss_fn` itself."""
    if not cfg.parallel.compile:
        return loss_fn
    return torch.compile(loss_fn, fullgraph=True)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (recompilations included)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompileClock:
    """What compiling costs a run, printed on rank 0: the compile time once, after the second
    optimizer step, and a warning for every later training step that compiled a graph (a
    recompilation, which costs as much as the first compile, every time it happens).

    torch.compile compiles during the first forward and backward, so the compile time is the
    first optimizer step's wall time (from the first compiled forward) less the second step's. A
    training step starts at the first compiled forward with autograd on (evaluation forwards,
    compiled anew for no_grad, are not a training step's) and ends at the optimizer's step,
    seen by a global optimizer hook; it counts once per step whatever wraps the optimizer
    (ZeroRedundancyOptimizer steps an inner one too)."""

    _instance: CompileClock | None = None

    def __init__(self, log):
        self.log = log
        self.marks: list[float] = []  # first forward, end of step 1, end of step 2
        self.steps = 0
        self.in_step = False
        self.graphs_at_start = self.graphs_before = graphs_compiled()
        self.handle = register_optimizer_step_post_hook(self._step_done)

    @classmethod
    def start(cls, log) -> None:
        if cls._instance is not None:  # the clock of an earlier run in this process
            cls._instance.handle.remove()
        cls._instance = cls(log)

    @classmethod
    def forward_ran(cls) -> None:
        clock = cls._instance
        if clock is None or clock.in_step or not torch.is_grad_enabled():
            return
        clock.in_step = True
        clock.graphs_before = graphs_compiled()
        if not clock.marks:
            clock.marks.append(time.perf_counter())

    def _step_done(self, optimizer, args, kwargs) -> None:
        if not self.in_step:  # a second hook call for the same step
            return
        self.in_step = False
        self.steps += 1
        if self.steps <= 2:
            self.marks.append(time.perf_counter())
        new = graphs_compiled() - self.graphs_before
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        if self.steps == 2:
            first = self.marks[1] - self.marks[0]
            second = self.marks[2] - self.marks[1]
            graphs = graphs_compiled() - self.graphs_at_start
            self.log(f"compile: {graphs} graphs, ~{first - second:.1f} s (first "
                     f"optimizer step {first:.1f} s less the second's {second:.2f} s: "
                     f"torch.compile builds its graphs in the first forward and backward)")
        elif self.steps > 2 and new:
            self.log(f"warning: torch.compile compiled {new} new graph(s) in this process's "
                     f"training step {self.steps} (a recompilation; TORCH_LOGS=recompiles says "
                     f"why)")
