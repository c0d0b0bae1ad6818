"""Pipeline parallelism with `torch.distributed.pipelining` (PipelineStage and its schedules).

The decoder is cut into `pp x virtual_stages` stages by ranges of consecutive layers (balanced,
or `parallel.pp_layers`); the embedding lives on the first stage, the final norm, the output
layer and the loss on the last. A stage is the model itself with the layers it does not own
deleted from `layers` (a ModuleDict keyed by layer index) and `tok_embeddings`/`pos_embeddings`/
`norm`/`output` set to None where not owned, so parameter names (FQNs) stay those of the whole
model and every rank checkpoints its own stage with DCP.

Stage `s` runs on pp rank `s % pp` (looped placement, as ScheduleInterleaved1F1B expects), so a
rank holds stages r, r + pp, ... With virtual_stages > 1 the rank's model (what the optimizer,
gradient clipping and checkpoints see) holds all its layers, and each stage is a *view* of it: a
shallow copy of the module sharing the submodules of its own layers (same parameter objects).

Schedules: gpipe (Huang et al. 2019), 1f1b (PipeDream-flush, Narayanan et al. 2021),
interleaved_1f1b (Megatron-LM's virtual stages, Narayanan et al. 2021), zero_bubble (Qi et al.
2023, input and weight gradients scheduled apart). The loss handed to the schedule is our
normalisation: sum of CE over unmasked tokens / global token count * dp size, with
`scale_grads=False` so the schedule does not divide by the number of micro-batches again.

MoE router losses (balance + z) arise on whatever stage holds the MoE layer, where the schedule's
loss is not. Each MoE layer's output therefore carries its router loss into the backward
(`_CarryRouterLoss`, the trick of Megatron-LM's MoEAuxLossAutoScaler): identity forward, and
the backward adds d(router loss) / n_microbatches, exactly the weight the loop gives it without a
pipeline (with parallel.pp_microbatches = 0 the schedule's micro-batches are the loop's).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.tensor import DTensor

from llmtrain.config import Config
from llmtrain.config.layout import micro_batches, rank_stages, stage_layer_ids
from llmtrain.model.moe import moe_layers, moe_metrics
from llmtrain.parallel import data as _data
from llmtrain.parallel.compile import apply_compile, compiled_loss
from llmtrain.parallel.context import apply_cp
from llmtrain.parallel.expert import apply_ep, build_ep_mesh
from llmtrain.parallel.init import materialize_shards
from llmtrain.parallel.parallelized import ParallelModel
from llmtrain.parallel.tensor import apply_tp
from llmtrain.train.loss import autocast, cross_entropy_sum

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
              "interleaved_1f1b": ScheduleInterleaved1F1B,
              "zero_bubble": ScheduleInterleavedZeroBubble}
_MULTI_STAGE = ("interleaved_1f1b", "zero_bubble")
# modules of the Transformer outside `layers` that run before the first / after the last layer
_FIRST_ONLY = ("tok_embeddings", "pos_embeddings", "embedding_proj")
_LAST_ONLY = ("norm", "output", "output_proj", "mos")


def _keep(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> None:
    """Delete from `model` (in place) what a stage with these layers and ends does not own."""
    for key in list(model.layers.keys()):
        if int(key) not in layer_ids:
            del model.layers[key]
    for name in (() if first else _FIRST_ONLY) + (() if last else _LAST_ONLY):
        if hasattr(model, name):
            setattr(model, name, None)


def _view(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """A stage sharing `model`'s submodules: a shallow copy with its own module/hook tables."""
    part = copy.copy(model)
    for k, v in vars(model).items():
        # _modules and the hook tables: the stage's own. _parameters and _buffers (the rope
        # tables): shared, so that materialising the rank's model (parallel/init.py) reaches them
        if isinstance(v, dict) and k not in ("_parameters", "_buffers"):
            part.__dict__[k] = type(v)(v)
    part.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
    _keep(part, layer_ids, first, last)
    return part


def split_model(model: nn.Module, cfg: Config,
                pp_rank: int) -> tuple[nn.Module, list[nn.Module], list[int]]:
    """(rank model, stage modules, stage indices) of pp rank `pp_rank`. The rank model is `model`
    with every layer the rank does not own deleted; with one stage per rank it is the stage."""
    layer_ids = stage_layer_ids(cfg)
    n_stages = len(layer_ids)
    stages = rank_stages(cfg, pp_rank)
    owned = sorted(i for s in stages for i in layer_ids[s])
    _keep(model, owned, 0 in stages, n_stages - 1 in stages)
    if len(stages) == 1:
        return model, [model], stages
    parts = [_view(model, layer_ids[s], s == 0, s == n_stages - 1) for s in stages]
    return model, parts, stages


def parallelize_pipeline(model: nn.Module, mesh: DeviceMesh, cfg: Config,
                         device: torch.device) -> ParallelModel:
    """Split `model` into this rank's stages, then tensor and data parallelism on each stage.
    The result's module holds all of this rank's parameters (original FQNs); its parts are the
    stages, wrapped by FSDP at ZeRO 2/3."""
    pp_mesh = mesh["pp"]
    rank_model, parts, stages = split_model(model, cfg, pp_mesh.get_local_rank())
    if mesh["tp"].size() > 1:
        for part in parts:
            apply_tp(part, mesh["tp"], cfg)
    if mesh["cp"].size() > 1:  # the stages' blocks are the rank model's
        apply_cp(rank_model, mesh["cp"])
    if cfg.parallel.ep > 1:  # the experts of this rank's layers, over the ep ranks of its stage
        apply_ep(rank_model, build_ep_mesh(mesh, cfg.parallel.ep))
    apply_compile(rank_model, cfg)  # the stages' blocks are the rank model's
    wrapped = []
    for part in parts:
        if cfg.parallel.zero_stage >= 2:
            part, _ = _data.apply_data_parallel(part, mesh, cfg, device)
        if hasattr(part, "set_reshard_after_forward"):
            # FSDP2 inside a pipeline keeps the gathered parameters from the forward of a
            # micro-batch to its backward (torchtitan): re-gathering per micro-batch costs more
            part.set_reshard_after_forward(False)
        wrapped.append(part)
    top = wrapped[0] if len(parts) == 1 else rank_model
    init_s = materialize_shards(top, device, cfg.train.seed,
                                params_on_cpu=cfg.parallel.offload == "cpu")
    # ZeRO 0/1: DDP's reducer expects one backward per forward, a pipeline stage runs one per
    # micro-batch (and one more for shape inference); the step averages the gradients after the
    # schedule's step, by the same plan as for tensor parallelism without DDP
    dp = _data.dp_mesh(mesh)
    grad_sync = (_data.grad_sync_plan(top, dp)
                 if cfg.parallel.zero_stage < 2 and dp.size() > 1 else [])
    return ParallelModel(top, grad_sync, parts=wrapped, stage_ids=stages,
                         pp_group=pp_mesh.get_group(), init_s=init_s)


class _CarryRouterLoss(torch.autograd.Function):
    """y = x in the forward; in the backward, also d(weight * aux)/d(aux) = weight into `aux`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


class _RouterLosses:
    """Forward hooks on this rank's MoE layers: while training, each output carries its layer's
    router loss into the backward (weight 1 / n_microbatches) and the detached losses are summed
    for the metrics.

    The schedules run each stage once more on its first step to infer shapes (torch's
    "metadata inference", on the first stage's tokens and on empty tensors elsewhere). That
    forward must leave no trace: `inference()` wraps it, and the hooks then restore the routers'
    load counts (what the aux-free bias update reads) and count no router loss."""

    def __init__(self, model: nn.Module, n_microbatches: int, device: torch.device):
        self.weight = 1.0 / n_microbatches
        self.total = torch.zeros((), device=device)
        self.inferring = False
        self._loads: dict[int, torch.Tensor] = {}
        for layer in moe_layers(model).values():
            layer.register_forward_pre_hook(self._before)
            layer.register_forward_hook(self._carry)

    @contextlib.contextmanager
    def inference(self):
        self.inferring = True
        try:
            yield
        finally:
            self.inferring = False

    def _before(self, module, args):
        if self.inferring:
            self._loads[id(module)] = module.router.load.clone()
            # a later stage infers shapes from uninitialised (torch.empty) inputs, different on
            # every tp rank: routed on zeros instead, all tp ranks route alike and the sizes of
            # their expert all-reduces match
            return (torch.zeros_like(args[0]), *args[1:])
        return None

    def _carry(self, module, args, out):
        if self.inferring:
            module.router.load.copy_(self._loads.pop(id(module)))
            return None
        if not (module.training and torch.is_grad_enabled()) or module.aux_loss is None:
            return None  # evaluation (no router loss in the validation loss)
        self.total = self.total + module.aux_loss.detach().float() * self.weight
        return _CarryRouterLoss.apply(out, module.aux_loss, self.weight)

    def pop(self) -> torch.Tensor:
        total, self.total = self.total, torch.zeros_like(self.total)
        return total

    def hide(self, stage: PipelineStage) -> None:
        """Run `stage`'s shape-inference forward inside `inference()`. The method's name is
        torch's and has changed (2.13: _forward_metadata_inference; before: _shape_inference);
        a torch with neither runs no such forward."""
        for name in ("_forward_metadata_inference", "_shape_inference"):
            method = getattr(stage, name, None)
            if method is not None:
                def hidden(*args, _method=method, **kwargs):
                    with self.inference():
                        return _method(*args, **kwargs)
                setattr(stage, name, hidden)


class _LossFn:
    """CE sum over unmasked tokens times `scale` (dp size / global token count while training);
    `target` is [B, T, 2]: labels and loss mask. Compiled with parallel.compile."""

    def __init__(self, cfg: Config):
        self.scale = 1.0
        self.ce_sum = compiled_loss(cfg, cross_entropy_sum)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce_sum(logits, target[..., 0], target[..., 1]) * self.scale


class Pipeline:
    """This rank's stages and the schedule that drives them; `run` does forward and backward of
    every micro-batch of one step (or forward only, for evaluation)."""

    def __init__(self, parallel: ParallelModel, cfg: Config, device: torch.device,
                 n_microbatches: int):
        self.cfg, self.device = cfg, device
        model, self.group = parallel.module, parallel.pp_group
        self.params = [p for p in model.parameters() if p.requires_grad]
        parts, stage_ids = parallel.parts, parallel.stage_ids
        n_stages = cfg.parallel.pp * cfg.parallel.virtual_stages
        self.stages = [PipelineStage(part, s, n_stages, device, group=self.group)
                       for part, s in zip(parts, stage_ids)]
        self.has_first = 0 in stage_ids
        self.has_last = n_stages - 1 in stage_ids
        self.loss_fn = _LossFn(cfg)
        self.router_losses = _RouterLosses(model, n_microbatches, device)
        for stage in self.stages:
            self.router_losses.hide(stage)
        schedule = _SCHEDULES[cfg.parallel.pp_schedule]
        stages = self.stages if cfg.parallel.pp_schedule in _MULTI_STAGE else self.stages[0]
        self.schedule = schedule(stages, n_microbatches=n_microbatches, loss_fn=self.loss_fn,
                                 scale_grads=False)

    def run(self, batches: list, scale: float, ctx=contextlib.nullcontext,
            train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of CE, router losses averaged over micro-batches and summed over MoE layers) of
        this dp rank's `batches` (the reader's micro-batches, concatenated and re-split into the
        schedule's micro-batches), the same on every pp rank."""
        tokens = torch.cat([b.tokens for b in batches]).to(self.device)
        target = torch.stack([torch.cat([b.labels for b in batches]),
                              torch.cat([b.loss_mask for b in batches]).long()], -1)
        args = (tokens,) if self.has_first else ()
        kwargs = {"target": target.to(self.device)} if self.has_last else {}
        if batches[0].positions is not None:  # context parallelism: every stage's rope reads them
            kwargs["positions"] = torch.cat([b.positions.expand(len(b.tokens), -1)
                                             for b in batches]).to(self.device)
        self.loss_fn.scale = scale
        losses: list[torch.Tensor] = []
        with ctx(), autocast(self.cfg, self.device):
            if train:
                self.schedule.step(*args, **kwargs, losses=losses, return_outputs=False)
            else:
                self.schedule.eval(*args, **kwargs, losses=losses)
        if train:
            self._shard_grads_like_params()
        ce_sum = (torch.stack([x.detach().float() for x in losses]).sum() / scale if losses
                  else torch.zeros((), device=self.device))
        # from the last stage to every pp rank; router losses from every stage
        sums = torch.stack([ce_sum, self.router_losses.pop()])
        dist.all_reduce(sums, group=self.group)
        return sums[0], sums[1]

    def moe_metrics(self, model: nn.Module):
        """moe_metrics of the whole model: every stage's MoE layers, gathered over pp."""
        if not self.cfg.model.moe.num_experts:
            return {}, {}
        parts = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, moe_metrics(model), group=self.group)
        record, histograms = {}, {}
        for r, h in parts:
            record.update(r)
            histograms.update(h)
        return record, histograms

    @torch.no_grad()
    def _shard_grads_like_params(self) -> None:
        """Under the pipeline schedules the vocab-parallel embedding's gradient comes back
        Replicate (whole on every tp rank) instead of Shard(0) like its parameter; the values
        are right, the memory is tp times too much and the optimizer would redistribute it at
        every step. Replicate -> Shard is a local slice (no communication)."""
        for p in self.params:
            g = p.grad
            if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
                p.grad = g.redistribute(p.device_mesh, p.placements)

    @torch.no_grad()
    def evaluate(self, reader, steps: int, ctx, dp_group) -> float:
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for s in range(steps):
            batches = [reader.get(s, m) for m in range(reader.n_micro)]
            total += self.run(batches, 1.0, ctx, train=False)[0]
            count += sum(float(b.loss_mask.sum()) for b in batches)
        if dp_group is not None:
            dist.all_reduce(total, group=dp_group)
            dist.all_reduce(count, group=dp_group)
        return float(total / count)


def build_pipeline(parallel: ParallelModel, cfg: Config, device: torch.device,
                   dp_size: int) -> Pipeline:
    """The pipeline of a model returned by `parallelize` with parallel.pp > 1. Micro-batches:
    `parallel.pp_microbatches`, 0 = the global batch per dp rank / train.micro_batch_size."""
    t = cfg.train
    n_mb = cfg.parallel.pp_microbatches or micro_batches(t.global_batch_size,
                                                         t.micro_batch_size, dp_size)
    return Pipeline(parallel, cfg, device, n_mb)
