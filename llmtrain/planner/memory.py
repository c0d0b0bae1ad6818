"""Per-GPU memory of a training layout: model states (ZeRO paper) and activations (Korthikanti).

Model states follow Rajbhandari et al. 2020 ("ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", Sec. 3.1 and Fig. 1): Adam in mixed precision keeps 2 bytes of bf16/fp16
parameters, 2 bytes of gradients and 12 bytes of fp32 master weights, momentum and variance per
parameter; stage 1 shards the optimizer states over the data-parallel group, stage 2 also the
gradients, stage 3 also the parameters.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Sec. 4-5, Table 2): s*b*h*(34 + 5*a*s/h) bytes per layer for a GPT layer (2-byte
elements, 1-byte dropout masks). `layer_activation_bytes` keeps the paper's term-by-term
accounting so that other shapes (GLU MLPs, grouped-query attention, no dropout, fused attention
kernels) change the right terms; for the paper's GPT layer it returns the paper's numbers exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmtrain.config import GLU_ACTIVATIONS, ModelConfig

GIB = 1024 ** 3

# bytes per parameter: (parameters, gradients, optimizer states) for Adam.
# bf16: ZeRO paper mixed precision 2 + 2 + 12 (fp32 master copy, momentum, variance);
# fp32: 4 + 4 + 8; bf16_pure: bf16 everywhere, Adam moments in bf16 and no master copy (2 + 2 + 4).
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8), "bf16_pure": (2, 2, 4)}

# Assumption until measured on the target machine: CUDA context, NCCL buffers, cuBLAS workspaces
# and allocator fragmentation take this much per GPU on top of what the formulas count.
FRAMEWORK_OVERHEAD_GIB = 2.0

@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a decoder, computed from its config (no model is built)."""

    embedding: int        # token (+ learned position) embeddings
    attention: int        # one layer's attention projections (+ biases)
    mlp: int              # one dense MLP (+ biases); also the size of one expert
    norms: int            # one layer's norms
    n_layers: int
    n_moe_layers: int
    experts_per_layer: int  # routed + shared experts in a MoE layer
    router: int           # one MoE layer's router
    final_norm: int
    output: int           # untied output projection (0 when tied to the embedding)
    vocab_proj: int       # vocab x d: the logits GEMM's weight, tied or not

    @property
    def dense_layer(self) -> int:
        return self.attention + self.mlp + self.norms

    @property
    def moe_layer_experts(self) -> int:
        return self.experts_per_layer * self.mlp

    @property
    def total(self) -> int:
        moe_extra = self.n_moe_layers * (self.moe_layer_experts - self.mlp + self.router)
        return (self.embedding + self.n_layers * self.dense_layer + moe_extra + self.final_norm
                + self.output)


def param_counts(m: ModelConfig) -> ParamCounts:
    h, d_attn, kv_dim = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    glu = m.activation in GLU_ACTIVATIONS
    attention = h * (d_attn + 2 * kv_dim) + d_attn * h
    mlp = (3 if glu else 2) * h * m.ffn_dim
    if m.bias:
        attention += d_attn + 2 * kv_dim + h
        mlp += (2 if glu else 1) * m.ffn_dim + h
    norm = (2 * h if m.norm == "layernorm" else h)
    if m.activation in ("polynorm", "polyrelu"):
        mlp += 4  # the polynomial's coefficients a_0..a_3 (model/mlp.py, PolyActivation)
    qk_norm = 2 * m.head_dim if m.qk_norm else 0  # q_norm and k_norm scales (attention.py)
    embedding = m.vocab_size * h + (m.max_seq_len * h if m.position == "learned" else 0)
    moe = m.moe
    n_moe = m.n_layers // moe.every_n_layers if moe.num_experts else 0
    return ParamCounts(
        embedding=embedding, attention=attention, mlp=mlp, norms=2 * norm + qk_norm,
        n_layers=m.n_layers, n_moe_layers=n_moe, experts_per_layer=moe.num_experts + moe.n_shared_experts,
        router=h * moe.num_experts, final_norm=norm,
        output=0 if m.tie_embeddings else m.vocab_size * h, vocab_proj=m.vocab_size * h)


def model_state_bytes(n_params: float, precision: str, zero_stage: int,
                      dp_shard: int) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer states on one GPU holding `n_params`
    (its tensor/pipeline share), with ZeRO `zero_stage` sharding over `dp_shard` ranks."""
    p, g, o = STATE_BYTES[precision]
    return {"params": n_params * p / (dp_shard if zero_stage >= 3 else 1),
            "grads": n_params * g / (dp_shard if zero_stage >= 2 else 1),
            "optimizer": n_params * o / (dp_shard if zero_stage >= 1 else 1)}


# bytes per element of the gradients FSDP reduce-scatters: fp32 unless the run is bf16 throughout
# (parallel/data.py: MixedPrecisionPolicy(reduce_dtype=float32) for bf16)
REDUCE_BYTES = {"bf16": 4, "fp32": 4, "bf16_pure": 2}


def zero_buffer_bytes(layer_params: float, precision: str, zero_stage: int, dp_shard: int,
                      gathered_blocks: float | None = None, root_params: float = 0.0,
                      overlap: bool = True) -> dict[str, float]:
    """Transient bytes of FSDP2's full-size buffers on one GPU, for blocks of `layer_params` (this
    GPU's tensor/expert share of one block), beyond the sharded model states, at the peak of the
    backward, while a block's backward runs:
    - "gathered" (ZeRO 3): `gathered_blocks` blocks' parameters all-gathered (by default two:
      the block running and the next, prefetched; in a pipeline, where FSDP keeps them from the
      forward to the backward, all the stage's blocks) and the root unit's `root_params` (embeddings, final
      norm, output), which is never resharded after the forward (parallel/data.py);
    - "unsharded_grads" (ZeRO 2, 3): the running block's gradients as autograd produces them, in
      the parameters' compute dtype;
    - "reduce_scatter" (ZeRO 2, 3): the previous block's reduce-scatter input, its gradients in
      the reduction dtype, which FSDP2 keeps until the next reduction for its communication
      stream (`reduce_scatter_states`).
    Nothing without sharding (dp_shard = 1: FSDP2 skips the collectives).
    `overlap=False` (the CPU, where parallel/data.py `without_overlap_buffers` turns off the
    prefetch and the kept input, which only serve overlap): one gathered block by default, not
    two, and no kept input: a block's own reduce-scatter input meets
    its gradients only during the copy, after its parameters are resharded, so it counts only
    where it exceeds that gathered block (bf16 parameters, fp32 reduction; all of it at ZeRO 2).
    Measured by benchmarks/peak_memory.py (docs/performance.md), 278M parameters at dp8 ZeRO-3
    on the CPU: with FSDP2's defaults the steady-state forward/backward exceeded the states by
    4.7 blocks (activations 0.4, root unit 0.1, the process's own growth 0.6, leaving 3.5 for
    the 4 counted here); without the prefetch 3.8, without the kept input 3.8, without both 2.9
    (the 2 counted here)."""
    sharded = dp_shard > 1
    p = STATE_BYTES[precision][0]
    if gathered_blocks is None:  # the running block, and with overlap the prefetched next
        gathered_blocks = 2 if overlap else 1
    reduce_scatter = layer_params * REDUCE_BYTES[precision]
    if not overlap and zero_stage >= 3:  # meets the gradients when the block's one gathered
        reduce_scatter = max(0.0, reduce_scatter - layer_params * p)  # copy is already freed
    return {"gathered": (gathered_blocks * layer_params + root_params) * p
            if zero_stage >= 3 and sharded else 0.0,
            "unsharded_grads": layer_params * p if zero_stage >= 2 and sharded else 0.0,
            "reduce_scatter": reduce_scatter if zero_stage >= 2 and sharded else 0.0}


# bytes per parameter of the one temporary torch's foreach AdamW makes (torch/optim/adamw.py,
# `_multi_tensor_adamw`: `exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)`, out of place,
# a copy of the second moments, which are fp32 unless bf16_pure keeps them in bf16); its other
# updates are in place. The fused kernel (`_fused_adamw_`, what train/optim.py picks on CUDA)
# makes none. Measured on the CPU by benchmarks/peak_memory.py: the optimizer step's peak
# exceeds the states by one fp32 copy of the rank's parameter shard and the process's own growth
# (278M parameters at dp1: 1108 MiB over the states = 1061 MiB of parameters + 46 MiB measured on
# a near-empty model; docs/performance.md). AdamW steps one parameter group at a time, so the
# caller takes the largest group's (at 278M ep2 dp2, whose expert and shared groups are about
# equal, the step exceeds the states by 416 MiB = 353 + 46 + 17, not the 706 of all parameters).
FOREACH_TEMP_BYTES = {"bf16": 4, "fp32": 4, "bf16_pure": 2}


def optimizer_step_bytes(n_params: float, precision: str, zero_stage: int, dp_shard: int,
                         kernel: str = "fused") -> float:
    """Transient bytes of AdamW's `step()` on one GPU holding `n_params` (its tensor/pipeline
    share), the optimizer sharded over `dp_shard` ranks from ZeRO stage 1: the foreach kernel's
    sqrt of the second moments (FOREACH_TEMP_BYTES), nothing for the fused kernel."""
    if kernel == "fused":
        return 0.0
    return n_params * FOREACH_TEMP_BYTES[precision] / (dp_shard if zero_stage >= 1 else 1)


def layer_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, *, sp: bool = False,
                           recompute: str = "none", ffn: int | None = None, glu: bool = False,
                           kv_heads: int | None = None, dropout: bool = True,
                           layernorm: bool = True, flash: bool = False,
                           elem_bytes: int = 2, cp: int = 1) -> float:
    """Bytes one transformer layer keeps for its backward pass on one GPU (Korthikanti Sec. 4).

    In units of s*b*h (2-byte elements): layer-norm inputs 2 + 2, QKV input 2, MLP input 2 and
    two 1-byte dropout masks are the 10 that plain tensor parallelism replicates; Q, K, V (6),
    the output-projection input (2) and the MLP's inner tensors (16 for a 4h GeLU MLP) are the
    24 it splits; the attention scores cost 5*a*s/h (softmax output 2, dropout mask 1, dropout
    output 2), split by t. Sequence parallelism splits the replicated part too. Selective
    recomputation drops the score term; full recomputation keeps only the layer input (2).
    `flash=True` models fused attention kernels that never store the s x s scores.
    `cp`: all-to-all context parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023) over cp ranks:
    every tensor outside the attention core holds s/cp tokens; the core holds the whole sequence
    for a/cp heads, the same bytes as s/cp tokens of all heads, and a/cp heads of s x s scores,
    which is the score term at the full s over s/cp tokens. So everything is divided by cp.
    """
    scale = elem_bytes / 2
    s_local = s / cp  # the tokens this rank holds; the score term keeps the full s below
    if recompute == "full":  # only the layer input is checkpointed (Table 2: sbh * 2)
        return 2 * s_local * b * h / (t if sp else 1) * scale
    ffn = ffn or 4 * h
    kv_ratio = (kv_heads or a) / a
    drop = 1 if dropout else 0
    replicated = (4 if layernorm else 2) + 2 + 2 + 2 * drop
    mlp_inner = (6 if glu else 4) * ffn / h  # GeLU: its input + fc2 input; GLU: gate, up, product
    split = 2 + 4 * kv_ratio + 2 + mlp_inner
    scores = 0.0 if (flash or recompute == "selective") else (2 + 3 * drop) * a * s / h
    per_sbh = replicated / (t if sp else 1) + split / t + scores / t
    return s_local * b * h * per_sbh * scale


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                            recompute: str = "none") -> float:
    """Korthikanti et al. 2022 Table 2, verbatim, for checking `layer_activation_bytes`."""
    if recompute == "full":
        return 2 * s * b * h
    score = 0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h / t * (34 + score)
    return s * b * h * (10 + 24 / t + score / t)


def inflight_layers(n_layers: int, pp: int, schedule: str, microbatches: int,
                    virtual_stages: int = 1) -> float:
    """Layers' worth of activations the first pipeline stage holds at its peak.

    1F1B (and ZB-H1 zero-bubble, whose peak equals 1F1B's) keeps min(p, m) microbatches of
    L/p layers: L layers however large p is (Korthikanti Sec. 4.2.3). GPipe keeps all m.
    Interleaved 1F1B keeps L * (1 + (p - 1) / (p * v)) (Korthikanti Sec. 4.2.3).
    """
    per_stage = math.ceil(n_layers / pp)
    if pp == 1:
        return float(n_layers)
    if schedule == "gpipe":
        return float(per_stage * microbatches)
    if schedule == "interleaved_1f1b":
        return n_layers * (1 + (pp - 1) / (pp * virtual_stages))
    return float(per_stage * min(pp, microbatches))
