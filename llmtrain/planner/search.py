"""Enumerate the parallel layouts a run can use on N GPUs, estimate each, rank by step time.

`check_layout` is the planner's own copy of the layout rules (docs/architecture.md, "The
mesh"): `config.validate()` also refuses combinations this build's trainer does not run yet (expert
parallelism with tp or ZeRO 2/3, for one), and the planner must reason about those layouts
too; `trainable_overrides` (`llmtrain train --plan auto`) keeps to what the validator accepts.

Overlap assumptions (stated once, used by `estimate`):
- tensor-parallel, expert and context-parallel all-to-all collectives sit on the critical path
  (not overlapped);
- pipeline point-to-point sends are on the critical path (one send forward and one backward per
  microbatch and model chunk);
- data-parallel gradient reduction (ZeRO 0-2) overlaps with the backward pass of the last
  microbatch, except the last 25 MB bucket; the ZeRO-1/2 parameter all-gather after the optimizer
  step is exposed;
- ZeRO-3 all-gathers (forward and backward) and reduce-scatters each microbatch, overlapped with
  that microbatch's compute except the first layer's gather;
- the optimizer step is memory-bound: parameters, gradients and states read and written once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmtrain.config import Config, ConfigError, ParallelDims, load_config
from llmtrain.config.layout import balanced_layer_counts, micro_batches
from llmtrain.planner import comm, compute, memory
from llmtrain.planner.compute import Hardware
from llmtrain.planner.memory import GIB

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
CHECKPOINTING = ("none", "selective", "full")
DDP_BUCKET_BYTES = 25 * 1024 ** 2  # torch DDP's default bucket_cap_mb
# Search pruning (an assumption, not a rule): context parallelism pays four all-to-alls per
# attention layer and pass to cut activations by cp; below this many tokens per rank its GEMMs
# shrink while those all-to-alls stay, so such layouts are not enumerated (`--layout fixed`
# still estimates them).
CP_MIN_TOKENS = 2048


@dataclass(frozen=True)
class Layout:
    """One parallel layout, in config.py's terms (`overrides()` gives the `--set` list)."""

    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    cp: int = 1
    zero_stage: int = 0
    engine: str = "torch"
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 1
    virtual_stages: int = 1
    activation_checkpointing: str = "none"
    sequence_parallel: bool = False
    micro_batch_size: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shard(self) -> int:
        """Ranks ZeRO shards parameters, gradients and optimizer states over: dp_shard x cp
        (context-parallel ranks hold different tokens of the same sequences and share the
        shards, as torchtitan's dp_shard_cp mesh does)."""
        return self.dp_shard * self.cp

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def overrides(self) -> list[str]:
        keys = ("tp", "pp", "dp_replicate", "dp_shard", "ep", "cp", "zero_stage", "engine",
                "pp_schedule", "pp_microbatches", "virtual_stages", "activation_checkpointing",
                "sequence_parallel")
        out = [f"parallel.{k}={_yaml(getattr(self, k))}" for k in keys]
        return out + [f"train.micro_batch_size={self.micro_batch_size}"]

    @classmethod
    def from_config(cls, cfg: Config, gpus: int) -> Layout:
        """The layout `cfg` sets, resolved on `gpus` GPUs by ParallelDims without its check that
        the degrees fit: `check_layout` reports that among the other rules."""
        p, d = cfg.parallel, ParallelDims.from_config(cfg, gpus, strict=False)
        return cls(tp=d.tp, pp=d.pp, dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, ep=d.ep,
                   cp=d.cp, zero_stage=p.zero_stage, engine=p.engine, pp_schedule=p.pp_schedule,
                   pp_microbatches=d.pp_microbatches, virtual_stages=p.virtual_stages,
                   activation_checkpointing=p.activation_checkpointing,
                   sequence_parallel=p.sequence_parallel,
                   micro_batch_size=cfg.train.micro_batch_size)


def _yaml(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(cfg: Config, lay: Layout, gpus: int) -> list[str]:
    """Every rule `lay` breaks for the run in `cfg` on `gpus` GPUs, one message each."""
    m, t = cfg.model, cfg.train
    errs = []
    if lay.world != gpus:
        errs.append(f"parallel layout pp={lay.pp} x dp_replicate={lay.dp_replicate} x dp_shard="
                    f"{lay.dp_shard} x cp={lay.cp} x tp={lay.tp} = {lay.world} does not match "
                    f"{gpus} GPUs")
    if m.n_heads % lay.tp:
        errs.append(f"parallel.tp={lay.tp} does not divide model.n_heads={m.n_heads}; use one "
                    f"of {', '.join(map(str, _divisors(m.n_heads)))}")
    if lay.cp > 1 and m.n_heads % (lay.cp * lay.tp):
        # all-to-all context parallelism gives each of the cp x tp ranks whole heads
        errs.append(f"parallel.cp={lay.cp} x parallel.tp={lay.tp} = {lay.cp * lay.tp} does not "
                    f"divide model.n_heads={m.n_heads}; use cp x tp among "
                    f"{', '.join(map(str, _divisors(m.n_heads)))}")
    if t.seq_len % lay.cp:
        errs.append(f"parallel.cp={lay.cp} does not divide train.seq_len={t.seq_len}")
    kv = m.kv_heads
    if kv % lay.tp and not (lay.tp > kv and lay.tp % kv == 0):
        errs.append(f"parallel.tp={lay.tp} neither divides model.n_kv_heads={kv} nor is a "
                    f"multiple of it (to replicate kv heads)")
    if m.ffn_dim % lay.tp:
        errs.append(f"parallel.tp={lay.tp} does not divide the MLP width {m.ffn_dim}")
    if lay.pp > m.n_layers:
        errs.append(f"parallel.pp={lay.pp} exceeds model.n_layers={m.n_layers}: every stage "
                    f"needs a layer")
    n_micro = micro_batches(t.global_batch_size, lay.micro_batch_size, lay.dp)
    if t.global_batch_size % (lay.micro_batch_size * lay.dp):
        errs.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                    f"train.micro_batch_size={lay.micro_batch_size} x data-parallel size {lay.dp}")
    elif lay.pp_microbatches != n_micro:
        errs.append(f"parallel.pp_microbatches={lay.pp_microbatches} is not global batch / "
                    f"(micro batch x dp) = {n_micro}")
    if lay.pp > 1 and lay.pp_microbatches < lay.pp:
        errs.append(f"parallel.pp_microbatches={lay.pp_microbatches} is fewer than the "
                    f"{lay.pp} pipeline stages")
    if lay.pp_schedule == "interleaved_1f1b":
        if lay.virtual_stages < 2 or m.n_layers % (lay.pp * lay.virtual_stages):
            errs.append(f"interleaved_1f1b needs parallel.virtual_stages >= 2 with pp x "
                        f"virtual_stages dividing model.n_layers={m.n_layers}; got pp={lay.pp}, "
                        f"virtual_stages={lay.virtual_stages}")
        if lay.pp_microbatches % lay.pp:
            errs.append(f"interleaved_1f1b needs parallel.pp_microbatches="
                        f"{lay.pp_microbatches} to be a multiple of parallel.pp={lay.pp}")
    elif lay.virtual_stages != 1:
        errs.append(f"parallel.virtual_stages={lay.virtual_stages} needs "
                    f"pp_schedule=interleaved_1f1b")
    if lay.ep > 1 and not m.moe.num_experts:
        errs.append(f"parallel.ep={lay.ep} needs a MoE model (model.moe.num_experts > 0)")
    if lay.dp_shard % lay.ep or (m.moe.num_experts and m.moe.num_experts % lay.ep):
        errs.append(f"parallel.ep={lay.ep} must divide parallel.dp_shard={lay.dp_shard} and "
                    f"model.moe.num_experts={m.moe.num_experts}")
    if lay.sequence_parallel and (lay.tp == 1 or t.seq_len % (lay.tp * lay.cp)):
        errs.append(f"parallel.sequence_parallel needs tp > 1 dividing train.seq_len="
                    f"{t.seq_len} / cp; got tp={lay.tp}, cp={lay.cp}")
    if lay.zero_stage not in (0, 1, 2, 3):
        errs.append(f"parallel.zero_stage={lay.zero_stage} is not one of 0, 1, 2, 3")
    if lay.pp_schedule not in SCHEDULES:
        errs.append(f"parallel.pp_schedule={lay.pp_schedule} is not one of {', '.join(SCHEDULES)}")
    if lay.activation_checkpointing not in CHECKPOINTING:
        errs.append(f"parallel.activation_checkpointing={lay.activation_checkpointing} is not "
                    f"one of {', '.join(CHECKPOINTING)}")
    if lay.engine == "deepspeed" and (lay.tp, lay.pp, lay.ep, lay.cp) != (1, 1, 1, 1):
        # assumption: our DeepSpeed engine (engines/deepspeed.py) runs ZeRO data parallel only
        errs.append("parallel.engine=deepspeed runs ZeRO data parallel only; use "
                    "tp=pp=ep=cp=1")
    return errs


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, float]        # bytes on the fullest GPU
    fits: bool
    step_time_s: float
    time_s: dict[str, float]        # where the step goes
    comm_bytes: dict[str, float]    # bytes one GPU sends per step, per dimension
    tokens_per_s: float
    mfu: float
    tflops_per_gpu: float           # model FLOPs (no recomputation) per second per GPU
    hw_tflops_per_gpu: float        # including recomputation, as Narayanan et al. count

    def to_json(self) -> dict:
        mem = {k: v / GIB for k, v in self.memory.items()}
        return {"layout": asdict(self.layout), "overrides": self.layout.overrides(),
                "fits": self.fits, "memory_gib": mem, "step_time_s": self.step_time_s,
                "time_s": self.time_s, "comm_bytes": self.comm_bytes,
                "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "tflops_per_gpu": self.tflops_per_gpu,
                "hw_tflops_per_gpu": self.hw_tflops_per_gpu}


def _stage_layer_counts(cfg: Config, lay: Layout) -> list[int]:
    """Layers on each pipeline rank, split as config/layout.py splits them: one entry per chunk
    (pp x virtual_stages; `parallel.pp_layers` when the config sets them for this layout, else
    balanced with the first chunks taking the remainder), rank r holding chunks r, r + pp, ..."""
    n, p, v = cfg.model.n_layers, lay.pp, lay.virtual_stages
    given = cfg.parallel.pp_layers
    chunks = list(given) if given and len(given) == p * v else balanced_layer_counts(n, p * v)
    return [sum(chunks[r::p]) for r in range(p)]


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def estimate(cfg: Config, lay: Layout, hw: Hardware, flash: bool = True) -> Estimate:
    """Memory and step time of `lay` for the run in `cfg` (see the module docstring)."""
    pc = memory.param_counts(cfg.model)
    counts = _stage_layer_counts(cfg, lay)  # layers on each pipeline rank
    per_stage, moe_frac = max(counts), pc.n_moe_layers / cfg.model.n_layers
    params = _gpu_params(cfg, lay, pc, counts, moe_frac)
    mem = _memory(cfg, lay, hw, params, counts, moe_frac, flash)

    # ---- time of one microbatch through the slowest stage, then the pipeline
    compute_t = _compute_time(cfg, lay, hw, pc, per_stage, moe_frac)
    tp_t, tp_bytes = _tp_comm(cfg, lay, hw, per_stage)
    ep_t, ep_bytes = _ep_comm(cfg, lay, hw, per_stage, moe_frac)
    cp_t, cp_bytes = _cp_comm(cfg, lay, hw, per_stage)
    pp_t, pp_bytes = _pp_comm(cfg, lay, hw)
    stage_t = compute_t + tp_t + ep_t + cp_t + pp_t
    mb = lay.pp_microbatches
    bubble = compute.bubble_slots(lay.pp_schedule, lay.pp, lay.virtual_stages) * stage_t
    pipeline_t = mb * stage_t + bubble

    # ---- data parallel, optimizer
    grad_bytes = max(params.first, params.last) * memory.STATE_BYTES[cfg.train.precision][1]
    dp_t, dp_bytes = _dp_time(lay, grad_bytes, hw, compute_t, per_stage)
    optimizer_t = 2 * (mem["params"] + mem["grads"] + mem["optimizer"]) / (hw.hbm_gbps * 1e9)
    step = pipeline_t + dp_t + optimizer_t

    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    gpus = lay.world
    model_flops = compute.model_flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    hw_flops = compute.hardware_flops_per_token(cfg.model, cfg.train.seq_len,
                                                lay.activation_checkpointing) * tokens
    return Estimate(
        layout=lay, memory=mem, fits=mem["total"] <= hw.gpu_mem_gib * GIB, step_time_s=step,
        time_s={"compute": mb * compute_t, "tp_comm": mb * tp_t, "ep_comm": mb * ep_t,
                "cp_comm": mb * cp_t, "pp_comm": mb * pp_t, "bubble": bubble,
                "dp_exposed": dp_t, "optimizer": optimizer_t},
        comm_bytes={"tp": mb * tp_bytes, "pp": pp_bytes, "dp": dp_bytes, "ep": mb * ep_bytes,
                    "cp": mb * cp_bytes},
        tokens_per_s=tokens / step, mfu=model_flops / (step * gpus * hw.peak_tflops * 1e12),
        tflops_per_gpu=model_flops / step / gpus / 1e12,
        hw_tflops_per_gpu=hw_flops / step / gpus / 1e12)


@dataclass(frozen=True)
class _GpuParams:
    """Parameters (elements) one GPU holds under a layout."""
    dense: float         # one dense layer
    expert: float        # the experts of one MoE layer
    layer_expert: float  # experts per layer, averaged over dense and MoE layers
    first: float         # all but experts on the first pipeline stage (holds the embedding)
    last: float          # all but experts on the last pipeline stage (holds the output layer)
    root_first: float    # of `first`, the parameters outside the blocks (FSDP's root unit)
    root_last: float     # of `last`, the same
    embedding: float     # of `first`, the embeddings (AdamW's no-decay group, train/optim.py)


def _gpu_params(cfg: Config, lay: Layout, pc: memory.ParamCounts, counts: list[int],
                moe_frac: float) -> _GpuParams:
    t, p = lay.tp, lay.pp
    dense_gpu = (pc.attention + pc.mlp) / t + pc.norms
    expert_gpu = pc.moe_layer_experts / lay.ep / t
    moe_shared_gpu = pc.attention / t + pc.norms + pc.router
    layer_shared = (1 - moe_frac) * dense_gpu + moe_frac * moe_shared_gpu
    out_proj = (pc.output if (pc.output or p > 1) else 0) / t  # tied: last stage keeps a copy
    root_first = pc.embedding / t + (pc.final_norm + out_proj if p == 1 else 0)
    root_last = pc.final_norm + out_proj
    return _GpuParams(dense_gpu, expert_gpu, moe_frac * expert_gpu,
                      counts[0] * layer_shared + root_first,
                      counts[-1] * layer_shared + root_last, root_first, root_last,
                      pc.embedding / t)


def _memory(cfg: Config, lay: Layout, hw: Hardware, params: _GpuParams, counts: list[int],
            moe_frac: float, flash: bool) -> dict[str, float]:
    """Bytes on the fullest GPU: of the first or the last pipeline stage, the larger. Two
    transient peaks that never meet (measured per phase by benchmarks/peak_memory.py):
    "activations" during forward and backward (with FSDP's full-size buffers), freed before the
    optimizer step; "optimizer_step", the optimizer's own temporaries. The total counts the
    larger of the two on top of the states and the overhead."""
    act_first, act_last = _activation_bytes(cfg, lay, counts, moe_frac, flash)
    overhead = hw.overhead_gib * GIB
    mems = []
    for shared, root, emb, act, n_layers in (
            (params.first, params.root_first, params.embedding, act_first, counts[0]),
            (params.last, params.root_last, 0.0, act_last, counts[-1])):
        # FSDP's full-size buffers (gathered blocks, unsharded gradients, the reduce-scatter
        # input), counted with the activations as transients; a pipeline stage keeps its
        # blocks gathered from forward to backward (parallel/pipeline.py). A stage's peak is
        # not where the CPU's switch-off of FSDP's overlap buffers acts (measured at 278M pp2
        # dp2: 1969.5 MiB with and without it): its unsharded gradients accumulate over the
        # micro-batches (torch's pipelining syncs only the last), which is not modelled: a known
        # gap (its planner/peak is the lowest row, 0.924); the kept-input term is kept there
        zero_buffers = sum(memory.zero_buffer_bytes(
            params.dense + params.expert * moe_frac, cfg.train.precision, lay.zero_stage,
            lay.shard, gathered_blocks=n_layers if lay.pp > 1 else None,
            root_params=root, overlap=hw.fsdp_overlap or lay.pp > 1).values())
        experts = n_layers * params.layer_expert
        st = _state_bytes(cfg, lay, shared, experts)
        # AdamW steps one parameter group at a time: decay and no-decay (the embeddings), each
        # split by device mesh (the experts apart: train/optim.py), so the largest group's
        # temporary is the peak
        opt_step = max(memory.optimizer_step_bytes(
            n, cfg.train.precision, lay.zero_stage, group, hw.adamw_kernel)
            for n, group in ((shared - emb, lay.shard), (emb, lay.shard),
                             (experts, max(lay.shard // lay.ep, 1))))
        mem = {**st, "activations": act + zero_buffers, "optimizer_step": opt_step,
               "overhead": overhead}
        mem["total"] = (st["params"] + st["grads"] + st["optimizer"] + overhead
                        + max(mem["activations"], opt_step))
        mems.append(mem)
    return max(mems, key=lambda d: d["total"])


def _state_bytes(cfg: Config, lay: Layout, shared: float, experts: float) -> dict[str, float]:
    """Parameter, gradient and optimizer bytes: ZeRO shards shared parameters over the
    dp_shard x cp ranks, experts over the dp_shard x cp / ep ranks that hold the same experts."""
    precision = cfg.train.precision
    st = memory.model_state_bytes(shared, precision, lay.zero_stage, lay.shard)
    ex = memory.model_state_bytes(experts, precision, lay.zero_stage,
                                  max(lay.shard // lay.ep, 1))
    return {k: st[k] + ex[k] for k in st}


def _activation_bytes(cfg: Config, lay: Layout, counts: list[int], moe_frac: float,
                      flash: bool) -> tuple[float, float]:
    """Activation bytes held on the first and on the last pipeline stage."""
    m, p, ac = cfg.model, lay.pp, lay.activation_checkpointing
    layer_act = ((1 - moe_frac) * _layer_activations(cfg, lay, ac, flash)
                 + moe_frac * _layer_activations(cfg, lay, ac, flash, True))
    transient = (_layer_activations(cfg, lay, "none", flash) if ac == "full"
                 else 0.0)  # the layer being recomputed
    # fp32 logits for the loss (Korthikanti Sec. 4.3), of this rank's s/cp tokens
    logits = 4 * cfg.train.seq_len / lay.cp * lay.micro_batch_size * m.vocab_size / lay.tp
    inflight = memory.inflight_layers(m.n_layers, p, lay.pp_schedule, lay.pp_microbatches,
                                      lay.virtual_stages)
    act_first = inflight * layer_act + transient + (logits if p == 1 else 0)
    act_last = counts[-1] * layer_act + transient + logits
    return act_first, act_last


def _layer_activations(cfg: Config, lay: Layout, recompute: str, flash: bool,
                       is_moe: bool = False) -> float:
    """Activation bytes one layer keeps for its backward pass."""
    m, moe = cfg.model, cfg.model.moe
    ffn = m.ffn_dim * ((moe.top_k + moe.n_shared_experts) if is_moe else 1)
    return memory.layer_activation_bytes(
        cfg.train.seq_len, lay.micro_batch_size, m.d_model, m.n_heads, lay.tp,
        sp=lay.sequence_parallel, recompute=recompute, ffn=ffn,
        glu=m.activation in memory.GLU_ACTIVATIONS, kv_heads=m.kv_heads,
        dropout=m.dropout > 0, layernorm=m.norm == "layernorm", flash=flash,
        elem_bytes=_act_bytes(cfg.train.precision), cp=lay.cp)


def _compute_time(cfg: Config, lay: Layout, hw: Hardware, pc: memory.ParamCounts,
                  per_stage: int, moe_frac: float) -> float:
    """Compute seconds of one microbatch on the slowest stage: the most layers any stage holds,
    plus the output layer and loss as on the last stage (the worst case)."""
    m, moe = cfg.model, cfg.model.moe
    b, s, t, cp = lay.micro_batch_size, cfg.train.seq_len, lay.tp, lay.cp
    sp, ac = lay.sequence_parallel, lay.activation_checkpointing
    dense_t = compute.layer_time(m, b, s, t, sp, ac, hw, cp=cp)
    moe_t = (compute.layer_time(m, b, s, t, sp, ac, hw,
                                mlp_mult=moe.top_k + moe.n_shared_experts,
                                mlp_split=max(moe.num_experts // lay.ep, 1), cp=cp)
             if pc.n_moe_layers else 0.0)
    layers_t = per_stage * ((1 - moe_frac) * dense_t + moe_frac * moe_t)
    return layers_t + compute.logits_time(m, b, s, t, hw, cp)


def _passes(lay: Layout) -> int:
    """Passes over each layer per microbatch: forward, backward (+ recomputed forward)."""
    return 3 if lay.activation_checkpointing == "full" else 2


def _hidden_bytes(cfg: Config, lay: Layout) -> float:
    """Bytes of one microbatch's hidden states on this GPU (b x s/cp x h): a tensor-parallel
    all-reduce."""
    return (lay.micro_batch_size * cfg.train.seq_len / lay.cp * cfg.model.d_model
            * _act_bytes(cfg.train.precision))


def _tp_comm(cfg: Config, lay: Layout, hw: Hardware, per_stage: int) -> tuple[float, float]:
    """(seconds, bytes one GPU sends) of one microbatch's tensor-parallel collectives."""
    t = lay.tp
    link = comm.link_for(1, t, hw)
    msg = _hidden_bytes(cfg, lay)
    # 2 all-reduces per pass (Megatron); with SP an all-gather + reduce-scatter each: same bytes
    n = per_stage * _passes(lay) * 2
    return (n * comm.collective_time("all_reduce", t, msg, link),
            n * comm.ring_bytes("all_reduce", t, msg))


def _ep_comm(cfg: Config, lay: Layout, hw: Hardware, per_stage: int,
             moe_frac: float) -> tuple[float, float]:
    """(seconds, bytes one GPU sends) of one microbatch's expert all-to-alls: dispatch and
    combine in every pass over a MoE layer."""
    moe, t = cfg.model.moe, lay.tp
    link = comm.link_for(t * lay.cp, lay.ep, hw)  # ep groups lie in dp_shard: stride tp x cp
    msg = (lay.micro_batch_size * cfg.train.seq_len / lay.cp / (t if lay.sequence_parallel else 1)
           * moe.top_k * cfg.model.d_model * _act_bytes(cfg.train.precision)
           * moe.capacity_factor)
    n_a2a = per_stage * moe_frac * 2 * _passes(lay)
    return (n_a2a * comm.collective_time("all_to_all", lay.ep, msg, link),
            n_a2a * comm.ring_bytes("all_to_all", lay.ep, msg))


def _cp_comm(cfg: Config, lay: Layout, hw: Hardware, per_stage: int) -> tuple[float, float]:
    """(seconds, bytes one GPU sends) of one microbatch's context-parallel all-to-alls: four per
    attention layer in every pass (forward, backward, recomputed forward), over the cp group
    (stride tp: cp sits between dp_shard and tp in the mesh)."""
    if lay.cp == 1:
        return 0.0, 0.0
    m = cfg.model
    link = comm.link_for(lay.tp, lay.cp, hw)
    args = (lay.micro_batch_size, cfg.train.seq_len, m.n_heads, m.kv_heads, m.head_dim, lay.cp,
            _act_bytes(cfg.train.precision))
    n = per_stage * _passes(lay)
    return (n * comm.cp_attention_time(*args, link, tp=lay.tp),
            n * comm.cp_all_to_all_bytes(*args, tp=lay.tp))


def _pp_comm(cfg: Config, lay: Layout, hw: Hardware) -> tuple[float, float]:
    """(seconds per microbatch, bytes per step one GPU sends) of pipeline point-to-point
    traffic: one send forward and one backward per microbatch and model chunk."""
    if not lay.pp > 1:
        return 0.0, 0.0
    link = comm.link_for(lay.tp * lay.cp * lay.dp, lay.pp, hw)
    msg = _hidden_bytes(cfg, lay) / (lay.tp if lay.sequence_parallel else 1)
    v = lay.virtual_stages
    return (2 * v * comm.collective_time("p2p", 2, msg, link),
            2 * v * lay.pp_microbatches * msg)


def _dp_time(lay: Layout, grad_bytes: float, hw: Hardware, stage_compute: float,
             stage_layers: int) -> tuple[float, float]:
    """(exposed seconds, bytes sent per GPU) of data-parallel traffic in one step. The gradients
    are summed over dp x cp (context-parallel ranks saw different tokens); ZeRO shards over
    dp_shard x cp (`Layout.shard`), the ranks of stride tp inside dp_replicate."""
    if lay.dp * lay.cp == 1:
        return 0.0, 0.0
    t, shard = lay.tp, lay.shard
    shard_link = comm.link_for(t, shard, hw)
    rep_link = comm.link_for(t * shard, lay.dp_replicate, hw)
    backward_window = stage_compute * 2 / 3  # the last microbatch's backward
    if lay.zero_stage == 0:
        n = lay.dp * lay.cp
        link = comm.link_for(t, n, hw)
        sync = comm.collective_time("all_reduce", n, grad_bytes, link)
        tail = comm.collective_time("all_reduce", n, DDP_BUCKET_BYTES, link)
        return max(0.0, sync - backward_window) + tail, comm.ring_bytes(
            "all_reduce", n, grad_bytes)
    # reduce-scatter over dp_shard x cp, all-reduce the shard over dp_replicate (HSDP)
    rs = comm.collective_time("reduce_scatter", shard, grad_bytes, shard_link)
    rs += comm.collective_time("all_reduce", lay.dp_replicate, grad_bytes / shard, rep_link)
    nbytes = (comm.ring_bytes("reduce_scatter", shard, grad_bytes)
              + comm.ring_bytes("all_reduce", lay.dp_replicate, grad_bytes / shard))
    ag = comm.collective_time("all_gather", shard, grad_bytes, shard_link)
    ag_bytes = comm.ring_bytes("all_gather", shard, grad_bytes)
    tail = comm.collective_time("reduce_scatter", shard, DDP_BUCKET_BYTES, shard_link)
    if lay.zero_stage < 3:
        return max(0.0, rs - backward_window) + tail + ag, nbytes + ag_bytes
    # ZeRO-3: every microbatch gathers parameters twice and reduce-scatters gradients
    per_mb = 2 * ag + rs
    first_layer = ag / stage_layers  # nothing to overlap the first gather with
    exposed = lay.pp_microbatches * max(0.0, per_mb - stage_compute) + first_layer
    return exposed, lay.pp_microbatches * (2 * ag_bytes + nbytes)


def _schedules(pp: int, n_layers: int, microbatches: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out = [("1f1b", 1), ("gpipe", 1), ("zero_bubble", 1)]
    if microbatches % pp == 0:
        out += [("interleaved_1f1b", v) for v in (2, 3, 4) if n_layers % (pp * v) == 0]
    return out


def _cp_degrees(cfg: Config, gpus: int, tp: int, engine: str) -> list[int]:
    """Context-parallel degrees worth estimating with tensor parallelism `tp`: powers of two
    with cp x tp dividing the heads and the GPUs, cp dividing the sequence, and each rank keeping
    at least CP_MIN_TOKENS tokens (shorter shards only add all-to-alls)."""
    m, s = cfg.model, cfg.train.seq_len
    if engine == "deepspeed":
        return [1]
    return [1] + [c for c in (2, 4, 8, 16, 32) if m.n_heads % (c * tp) == 0
                  and gpus % (c * tp) == 0 and s % c == 0 and s // c >= CP_MIN_TOKENS]


def enumerate_layouts(cfg: Config, gpus: int, hw: Hardware,
                      engine: str = "torch") -> list[Layout]:
    """Every layout worth estimating for `cfg` on `gpus` GPUs that passes `check_layout`.

    Pruned to what can win: tp is a power of two within one node; cp a power of two leaving each
    rank at least CP_MIN_TOKENS tokens; ZeRO 0 puts all data parallelism in one plain DDP group
    (dp_replicate=1); ZeRO >= 1 shards over all of dp (x cp) or (HSDP) over one node's worth of
    ranks; micro batches are divisors of the per-replica batch up to 32; the DeepSpeed engine
    is data parallel only.
    """
    m, t = cfg.model, cfg.train
    out = []
    tps = [x for x in (1, 2, 4, 8, 16, 32) if x <= min(gpus, hw.gpus_per_node)]
    if engine == "deepspeed":
        tps = [1]
    for tp, cp in [(tp, cp) for tp in tps for cp in _cp_degrees(cfg, gpus, tp, engine)]:
        inner = tp * cp  # the ranks of one data-parallel rank's pipeline stage
        for pp in _divisors(gpus // inner) if gpus % inner == 0 else []:
            if pp > m.n_layers or (engine == "deepspeed" and pp > 1):
                continue
            dp = gpus // (inner * pp)
            if t.global_batch_size % dp:
                continue
            per_replica = t.global_batch_size // dp
            for zero in ((0, 1, 2, 3) if dp * cp > 1 else (0,)):
                reps = {1}
                if zero and inner < hw.gpus_per_node and dp * inner > hw.gpus_per_node:
                    node_shard = hw.gpus_per_node // inner
                    if dp % node_shard == 0:
                        reps.add(dp // node_shard)
                for rep in sorted(reps):
                    shard = dp // rep
                    eps = [e for e in _divisors(shard) if m.moe.num_experts
                           and m.moe.num_experts % e == 0] or [1]
                    if engine == "deepspeed":
                        eps = [1]
                    for ep in eps:
                        for sp in ((False, True) if tp > 1 else (False,)):
                            for ac in CHECKPOINTING:
                                for b in _divisors(per_replica):
                                    if b > 32:
                                        break
                                    mb = per_replica // b
                                    for sched, v in _schedules(pp, m.n_layers, mb):
                                        lay = Layout(tp=tp, pp=pp, dp_replicate=rep,
                                                     dp_shard=shard, ep=ep, cp=cp,
                                                     zero_stage=zero, engine=engine,
                                                     pp_schedule=sched, pp_microbatches=mb,
                                                     virtual_stages=v,
                                                     activation_checkpointing=ac,
                                                     sequence_parallel=sp, micro_batch_size=b)
                                        if not check_layout(cfg, lay, gpus):
                                            out.append(lay)
    return out


def plan(cfg: Config, gpus: int, hw: Hardware, *, fixed: bool = False, engine: str = "torch",
         flash: bool = True) -> list[Estimate]:
    """Estimates ranked best first: fitting layouts by step time, then the rest by memory.
    `fixed` evaluates only the layout the config sets (ConfigError if it breaks a rule)."""
    if gpus < 1:
        raise ConfigError(f"--gpus={gpus} must be at least 1")
    if fixed:
        lay = Layout.from_config(cfg, gpus)
        errs = check_layout(cfg, lay, gpus)
        if errs:
            raise ConfigError("; ".join(errs))
        return [estimate(cfg, lay, hw, flash)]
    layouts = enumerate_layouts(cfg, gpus, hw, engine)
    if not layouts:
        raise ConfigError(f"no parallel layout of {gpus} GPUs satisfies the rules for this run "
                          f"(train.global_batch_size={cfg.train.global_batch_size}, model."
                          f"n_heads={cfg.model.n_heads}, model.n_layers={cfg.model.n_layers}); "
                          f"try a GPU count that divides the global batch")
    ests = [estimate(cfg, lay, hw, flash) for lay in layouts]
    return sorted(ests, key=lambda e: (not e.fits, e.step_time_s if e.fits
                                       else e.memory["total"]))


def best_layout(cfg: Config, gpus: int, hw: Hardware = compute.H100_SXM) -> Layout:
    """The fastest layout that fits in memory; `.overrides()` gives its `--set` list."""
    best = plan(cfg, gpus, hw)[0]
    if not best.fits:
        raise ConfigError(
            f"no layout of {gpus} GPUs fits in {hw.gpu_mem_gib:g} GiB per GPU; the smallest "
            f"needs {best.memory['total'] / GIB:.1f} GiB ({' '.join(best.layout.overrides())}); "
            f"use more GPUs or GPUs with more memory")
    return best.layout


def trainable_overrides(path, sets: list[str], gpus: int,
                        hw: Hardware = compute.H100_SXM) -> tuple[list[str], Estimate]:
    """`--set` overrides of the best fitting layout that this build's trainer accepts (the
    planner enumerates layouts the trainer may not run yet, e.g. ep with ZeRO 3): the
    ranked plan, filtered through the config validator at `gpus` ranks."""
    cfg = load_config(path, sets, world_size=gpus)
    for est in plan(cfg, gpus, hw):
        if not est.fits:
            break
        chosen = est.layout.overrides()
        try:
            load_config(path, [*sets, *chosen], world_size=gpus)
        except ConfigError:
            continue
        return chosen, est
    raise ConfigError(f"no layout of {gpus} GPUs that this trainer runs fits in "
                      f"{hw.gpu_mem_gib:g} GiB per GPU; run `llmtrain plan` to see the candidates")
