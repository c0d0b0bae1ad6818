"""One training step, behind the interface every engine implements.

A step object is built once per run from explicit parts (the model, its optimizer, the config, the
data-parallel group) and called once per optimizer step with that step's micro-batches and
learning rate; it returns a `StepResult`. `TrainStep` runs a plain, DDP, FSDP, tensor- or
expert-parallel model; `PipelineStep` hands the micro-batches to a pipeline schedule
(parallel/pipeline.py); the DeepSpeed engine's `DeepSpeedStep` (engines/deepspeed.py) lets
DeepSpeed accumulate, clip and step. The loop (train/loop.py) and `llmtrain bench` call them alike.

Loss normalisation: the loss of a step is the mean next-token cross entropy over every unmasked
token of the *global* batch. Each micro-batch contributes sum(CE) / N_global, so gradient
accumulation and data parallelism give the same gradients as one process with the whole batch
(DDP/FSDP average over dp ranks, hence the factor dp). With context parallelism each rank's
micro-batch holds its 1/cp of the tokens, N_global counts every token once over dp x cp ranks,
and the gradients are averaged over dp x cp (hence the factor dp x cp): each token counted once.
MoE router losses are each rank's over its own tokens, added once (over n_micro) to its loss:
the average over dp x cp counts them once, not once per cp rank (docs/long_context.md).

Host syncs: a training step copies from the device to the host once, `HOST_SYNCS_PER_STEP`
(`TrainStep.__call__`); everything else it computes (token count, loss, clip coefficient,
router losses) stays on the device, and MoE metrics are read only when the loop logs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from llmtrain.config import Config
from llmtrain.data.loader import Batch
from llmtrain.model.moe import aux_loss as moe_aux_loss
from llmtrain.model.moe import moe_layers, moe_metrics, update_bias
from llmtrain.parallel import clip_grad_norm_, state_bytes
from llmtrain.parallel.compile import compiled_loss
from llmtrain.parallel.data import GradReducer
from llmtrain.parallel.parallelized import ParallelModel
from llmtrain.train.lean_loss import chunked_loss_head
from llmtrain.train.loss import all_reduce_sum, autocast, cross_entropy_sum, reduce_step_losses


# The device-to-host copies one TrainStep call makes (tests/test_step.py counts them): the loss
# and the gradient norm, together, for the skip decision (train/guards.py's spike detector reads
# the same loss every step).
HOST_SYNCS_PER_STEP = 1


@dataclasses.dataclass
class StepResult:
    """What a step reports. `loss`, `grad_norm` and `skipped` are host values (a decision needs
    them every step); `moe_aux_loss` may be a device tensor and `moe` a function computing the
    metrics: the loop converts them on logging steps only (`float()`, `moe_metrics()`)."""
    loss: float  # mean CE per token of the global batch
    lr: float
    grad_norm: float  # before clipping; nan where the engine computed none
    skipped: bool  # non-finite loss or gradient norm: the optimizer did not step
    sample_ids: list[int]  # this rank's samples, for a loss-spike report
    moe_aux_loss: float | torch.Tensor = 0.0  # router losses, averaged over micro-batches, dp
    # moe_metrics of the whole model (record, histograms), or a function returning them
    moe: tuple[dict, dict] | Callable[[], tuple[dict, dict]] = ({}, {})
    state_bytes: dict[str, int] | None = None  # this rank's model-state bytes, when asked

    def moe_metrics(self) -> tuple[dict, dict]:
        """The MoE metrics of the step (a pipeline gathers them over its stages: collective,
        so every rank calls this on the same steps)."""
        return self.moe() if callable(self.moe) else self.moe


@dataclasses.dataclass
class DataParallelGroup:
    """The ranks whose tokens make up the global batch: the global token count and the reported
    losses are summed over `group` (None on one process) of `size` ranks, and the gradients are
    averaged over it. With context parallelism these are dp x cp ranks, of which `size // cp`
    read different sequences (the cp ranks of one dp rank hold different tokens of the same
    sequences)."""
    group: object | None = None
    size: int = 1
    cp: int = 1

    @property
    def readers(self) -> int:
        """The data-parallel ranks: those that read different sequences."""
        return self.size // self.cp


def model_logits(model: nn.Module, batch: Batch, device: torch.device,
                 head: Callable | None = None) -> torch.Tensor:
    """The logits of a decoder (with document ids where attention resets at end of document) or
    an encoder-decoder (source, target) batch; given `head`, what it makes of the decoder's
    final hidden states instead (Transformer.forward)."""
    tokens = batch.tokens.to(device)
    if batch.src is not None:
        return model(batch.src.to(device), tokens, batch.src_mask.to(device))
    kwargs = {} if head is None else {"head": head}
    if batch.positions is not None:
        kwargs["positions"] = batch.positions.to(device)
    if batch.doc_ids is not None:
        return model(tokens, doc_ids=batch.doc_ids.to(device), **kwargs)
    return model(tokens, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: `lr` times the group's `lr_scale` (muP's multipliers, train/optim.py
    `param_groups`; 1 where absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def global_token_count(batches: list[Batch], device: torch.device,
                       dp: DataParallelGroup) -> torch.Tensor:
    """N_global: the unmasked tokens of the whole global batch (one all-reduce). Counted where
    the masks are (the loader's host tensors) and copied to the device, never read back."""
    n_local = torch.stack([b.loss_mask.sum() for b in batches]).sum(dtype=torch.float32)
    return all_reduce_sum(n_local.to(device), dp.group)


def sample_ids(batches: list[Batch]) -> list[int]:
    """The samples of a step's micro-batches, in order (a loss-spike report names them)."""
    return [i for b in batches for i in b.sample_ids]


def update_router_bias(model: nn.Module, dp: DataParallelGroup) -> None:
    """After an optimizer step: every rank moves its aux-free router biases by the global load."""
    routers = [m.router for m in moe_layers(model).values() if m.router.aux_free_bias]
    for r in routers:
        all_reduce_sum(r.load, dp.group)
    if routers:
        update_bias(model)


class TrainStep:
    """The torch engine's step: forward and backward of each micro-batch (gradient accumulation,
    DDP's sync only at the last), the reductions no wrapper does (`GradReducer`, launched from
    gradient hooks during the last micro-batch's backward), the clipped global gradient norm,
    and the optimizer step unless the loss or the norm is non-finite. With
    `train.loss: chunked` or `fused` the loss is train/lean_loss.py's, fused with the output
    layer. `ce_sum_of(batch)` replaces the loss by another model's own (bench's Hugging Face
    models compute theirs in their forward, compiled with it)."""

    overlap = True  # reduce gradients during the backward (PipelineStep: after it)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                 device: torch.device, dp: DataParallelGroup | None = None, *,
                 parallel: ParallelModel | None = None, tp: int = 1,
                 ce_sum_of: Callable[[Batch], torch.Tensor] | None = None):
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.dp = dp or DataParallelGroup()
        self.parallel = parallel or ParallelModel(model)
        self.tp = tp
        self.ce_sum_of = ce_sum_of
        self.chunk_tokens = cfg.train.loss_chunk_tokens if cfg.train.loss != "plain" else 0
        self.clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        self.ce_sum = compiled_loss(cfg, cross_entropy_sum)  # parallel.compile: compiled too
        self.reducer = GradReducer(self.parallel.grad_sync, list(model.parameters()),
                                   overlap=self.overlap)

    def loss_parallel(self):
        """Tensor parallelism: the vocab-sharded logits' cross entropy (and its backward)."""
        return loss_parallel() if self.tp > 1 else contextlib.nullcontext()

    def forward_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of CE over the batch's unmasked tokens, their count)."""
        mask, labels = batch.loss_mask.to(self.device), batch.labels.to(self.device)
        with autocast(self.cfg, self.device):
            if self.ce_sum_of is not None:
                return self.ce_sum_of(batch), mask.sum()
            if self.chunk_tokens:
                sp = self.cfg.parallel.sequence_parallel and self.tp > 1
                head = chunked_loss_head(labels, mask, self.chunk_tokens, sp,
                                         fused=self.cfg.train.loss == "fused")
                return model_logits(self.model, batch, self.device, head), mask.sum()
            logits = model_logits(self.model, batch, self.device)
        return self.ce_sum(logits, labels, mask), mask.sum()

    def forward_backward(self, batches: list[Batch],
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of CE, router losses averaged over micro-batches) of this rank's micro-batches,
        each backward of CE x `scale` (+ router losses / n_micro) accumulated into the grads."""
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        n_micro = len(batches)
        for m, batch in enumerate(batches):
            last = m == n_micro - 1
            no_sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not last \
                else contextlib.nullcontext()
            if last:
                self.reducer.arm()
            with no_sync, self.loss_parallel():
                ce_sum, _ = self.forward_loss(batch)
                step_loss = ce_sum * scale
                aux = moe_aux_loss(self.model)  # MoE balance + z losses (None if dense)
                if aux is not None:  # mean over micro-batches; DDP/FSDP average it over dp
                    step_loss = step_loss + aux / n_micro
                    aux_sum += aux.detach() / n_micro
                step_loss.backward()
            loss_sum += ce_sum.detach()
        return loss_sum, aux_sum

    def __call__(self, batches: list[Batch], lr: float,
                 measure_state: bool = False) -> StepResult:
        """One optimizer step on this rank's micro-batches of the step; `measure_state`: also
        report this rank's model-state bytes (after the update, before gradients are freed).

        Its one host sync (HOST_SYNCS_PER_STEP): the loss and the gradient norm (before
        clipping), copied to the host together after clipping, before the optimizer step.
        Whether to step is a host decision (a skipped step must not touch the weights or the
        AdamW moments and step count), and the loop's spike guard needs the loss every step
        anyway: one copy serves both. On the GPU it waits for the backward and the gradient
        reductions; the optimizer step is launched after it."""
        self.model.train()
        set_lr(self.optimizer, lr)
        n_global = global_token_count(batches, self.device, self.dp)
        loss_sum, aux_sum = self.forward_backward(batches, self.dp.size / n_global)
        self.reducer.finish()
        loss, aux_mean = reduce_step_losses(loss_sum, aux_sum, n_global, self.dp.group,
                                            self.dp.size)
        grad_norm = clip_grad_norm_(self.model, self.clip, self.parallel.pp_group)
        loss_h, norm_h = torch.stack([loss.float(), grad_norm.float()]).tolist()  # the sync
        finite = math.isfinite(loss_h) and math.isfinite(norm_h)
        if finite:
            self.optimizer.step()
            update_router_bias(self.model, self.dp)
        state = state_bytes(self.model, self.optimizer) if measure_state else None
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_h, lr, norm_h, not finite, sample_ids(batches), aux_mean.detach(),
                          self.moe_metrics, state)

    def moe_metrics(self) -> tuple[dict, dict]:
        return moe_metrics(self.model)

    @torch.no_grad()
    def evaluate(self, reader, steps: int) -> float:
        """Mean CE per token over the first `steps` steps of `reader` (every dp rank's part)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for s in range(steps):
            for m in range(reader.n_micro):
                with self.loss_parallel():
                    ce_sum, n = self.forward_loss(reader.get(s, m))
                total += ce_sum
                count += n
        return float(all_reduce_sum(total, self.dp.group) / all_reduce_sum(count, self.dp.group))


class PipelineStep(TrainStep):
    """`parallel.pp > 1`: a pipeline schedule runs the micro-batches through this rank's stages
    (parallel/pipeline.py); the rest of the step is the torch engine's. The gradient reductions
    (ZeRO 0/1) run after the schedule's step, not from gradient hooks: the schedule runs the
    backward of each micro-batch when its order says (1F1B interleaves them with forwards, zero
    bubble splits input and weight gradients), so which backward is a parameter's last is the
    schedule's knowledge, not the step's; and its stage-to-stage sends would interleave with
    the hooks' all-reduces in an order that differs between stages."""

    overlap = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                 device: torch.device, dp: DataParallelGroup, *, parallel: ParallelModel,
                 tp: int = 1):
        super().__init__(model, optimizer, cfg, device, dp, parallel=parallel, tp=tp)
        # imported here: torch.distributed.pipelining imports torch._dynamo (~1 s)
        from llmtrain.parallel.pipeline import build_pipeline
        self.pipeline = build_pipeline(parallel, cfg, device, self.dp.readers)

    def forward_backward(self, batches: list[Batch],
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipeline.run(batches, scale, self.loss_parallel)

    def moe_metrics(self) -> tuple[dict, dict]:
        return self.pipeline.moe_metrics(self.model)

    @torch.no_grad()
    def evaluate(self, reader, steps: int) -> float:
        self.model.eval()
        return self.pipeline.evaluate(reader, steps, self.loss_parallel, self.dp.group)


def build_step(parallel: ParallelModel, optimizer: torch.optim.Optimizer, cfg: Config,
               device: torch.device, dp: DataParallelGroup, tp: int = 1) -> TrainStep:
    """The torch engine's step for a model `parallelize()` returned."""
    cls = PipelineStep if parallel.parts else TrainStep
    return cls(parallel.module, optimizer, cfg, device, dp, parallel=parallel, tp=tp)
