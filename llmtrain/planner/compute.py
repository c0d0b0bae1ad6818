"""Compute time of a layout: FLOPs per token, GEMM efficiency by shape, pipeline bubbles.

FLOP counts follow Narayanan et al. 2021 (Megatron-LM, eq. 3) and Korthikanti et al. 2022
(Appendix A): only GEMMs count; a token costs 6 FLOPs per weight it meets (forward 2, backward 4)
plus 12*L*h*s for the attention scores and the attention over values (s x s, not halved for the
causal mask, as both papers count). The logits GEMM counts as a weight (vocab x d) whether or not
it is tied to the input embedding; the embedding lookup costs nothing.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from llmtrain.config import ModelConfig
from llmtrain.planner.memory import GLU_ACTIVATIONS, param_counts


@dataclass(frozen=True)
class Hardware:
    """One GPU type and its cluster. Bandwidths are GB/s (1e9 bytes/s) per GPU, one direction."""

    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    peak_tflops: float = 989.0     # dense bf16 (H100 SXM datasheet)
    nvlink_gbps: float = 450.0     # NVLink 4: 900 GB/s bidirectional per GPU
    net_gbps: float = 50.0         # one 400 Gb/s NDR NIC per GPU
    hbm_gbps: float = 3350.0
    # Assumptions (alpha-beta model): latency per ring step and the fraction of the link's
    # bandwidth NCCL reaches on large messages.
    alpha_intra_us: float = 5.0
    alpha_inter_us: float = 10.0
    link_efficiency: float = 0.8
    overhead_gib: float = 2.0      # memory.FRAMEWORK_OVERHEAD_GIB, an assumption until measured
    # AdamW's kernel as train/optim.py picks it: fused on CUDA, foreach elsewhere (the CPU),
    # whose step holds a temporary copy of the second moments (memory.optimizer_step_bytes)
    adamw_kernel: str = "fused"
    # FSDP2's overlap buffers (the backward's prefetch of the next block, the kept reduce-scatter
    # input): on a GPU; off on the CPU (parallel/data.py `without_overlap_buffers`)
    fsdp_overlap: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


H100_SXM = Hardware()
# DGX A100 (Selene) as Narayanan et al. 2021 Sec. 5 describe it: 312 TFLOP/s bf16, NVLink 3
# (600 GB/s bidirectional), eight 200 Gb/s HDR InfiniBand NICs per 8-GPU node.
A100_80GB = Hardware(peak_tflops=312.0, nvlink_gbps=300.0, net_gbps=25.0, hbm_gbps=2039.0)


@functools.lru_cache(maxsize=None)
def gemm_table(path: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    data = json.loads(Path(path or Path(__file__).with_name("gemm_efficiency.json")).read_text())
    return tuple(data["gemm_flops"]), tuple(data["efficiency"]), float(data["attention_factor"])


def gemm_efficiency(flops: float) -> float:
    """Fraction of peak a GEMM of `flops` (2*M*N*K) reaches: log-linear in the shipped table."""
    xs, ys, _ = gemm_table()
    if flops <= xs[0]:
        return ys[0]
    if flops >= xs[-1]:
        return ys[-1]
    lf = math.log10(flops)
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if flops <= x1:
            return y0 + (y1 - y0) * (lf - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
    return ys[-1]  # unreachable


def model_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """6 * N + 12 * L * h * s: the model FLOPs of MFU (no recomputation)."""
    return 6 * active_params(m) + 12 * m.n_layers * m.n_heads * m.head_dim * seq_len


def active_params(m: ModelConfig) -> float:
    """Weights one token is multiplied with: every layer's matrices (top_k routed + shared
    experts in a MoE layer) plus the logits projection; embeddings are lookups, not GEMMs."""
    pc = param_counts(m)
    per_moe = pc.mlp * (m.moe.top_k + m.moe.n_shared_experts) + pc.router
    return ((pc.n_layers - pc.n_moe_layers) * pc.dense_layer
            + pc.n_moe_layers * (pc.attention + pc.norms + per_moe)
            + pc.final_norm + pc.vocab_proj)


def hardware_flops_per_token(m: ModelConfig, seq_len: int, recompute: str) -> float:
    """Model FLOPs plus recomputation: full recompute repeats each layer's forward (2N + 4Lhs,
    so x4/3 of the layers; the logits are not recomputed, as in Narayanan eq. 3); selective
    recomputes the attention scores and attention over values (4*L*h*s, Korthikanti App. A)."""
    base = model_flops_per_token(m, seq_len)
    attn = 4 * m.n_layers * m.n_heads * m.head_dim * seq_len
    if recompute == "full":
        return base + 2 * (active_params(m) - param_counts(m).vocab_proj) + attn
    if recompute == "selective":
        return base + attn
    return base


def layer_gemms(m: ModelConfig, tokens: int, b: int, s: int, tp: int, mlp_mult: float = 1.0,
                mlp_split: int = 1, cp: int = 1) -> list[tuple[float, float]]:
    """(flops, efficiency) of each forward GEMM of one layer on one GPU for `tokens` tokens (b*s,
    or b*s/cp under context parallelism), with weights split `tp` ways (Megatron column/row
    parallel). A MoE layer runs `mlp_mult` (top_k + shared) MLPs' worth of FLOPs as `mlp_split`
    smaller GEMMs (its local experts). All-to-all context parallelism over `cp` ranks runs the
    attention over the whole sequence s for n_heads / (tp * cp) heads (DeepSpeed-Ulysses)."""
    h, d_attn, kv_dim = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    ffn_out = m.ffn_dim * (2 if m.activation in GLU_ACTIVATIONS else 1)
    weights = [h * (d_attn + 2 * kv_dim) / tp, d_attn * h / tp, h * ffn_out / tp,
               m.ffn_dim * h / tp]
    out = [(2 * tokens * w, gemm_efficiency(2 * tokens * w)) for w in weights[:2]]
    for w in weights[2:]:
        f = 2 * tokens * w * mlp_mult
        out.append((f, gemm_efficiency(f / mlp_split)))
    _, _, attn_factor = gemm_table()
    score = 2 * b * s * s * d_attn / (tp * cp)  # QK^T and attention-over-V: same FLOPs each
    out += [(score, gemm_efficiency(score) * attn_factor)] * 2
    return out


def gemm_time(gemms: list[tuple[float, float]], peak_flops: float) -> float:
    return sum(f / (e * peak_flops) for f, e in gemms)


def layer_time(m: ModelConfig, b: int, s: int, tp: int, sp: bool, recompute: str,
               hw: Hardware, mlp_mult: float = 1.0, mlp_split: int = 1, cp: int = 1) -> float:
    """Seconds of forward + backward (+ recomputation) of one dense layer for one microbatch on
    one GPU: GEMMs at their shape's efficiency, backward = 2x forward (input and weight
    gradients), plus memory-bound elementwise work (norms, residuals, activation function,
    softmax), estimated as ~16 passes over h-sized and ~4 over ffn-sized tensors at HBM speed.
    Context parallelism over `cp` ranks: this GPU's s/cp tokens."""
    peak = hw.peak_tflops * 1e12
    gemms = layer_gemms(m, b * s // cp, b, s, tp, mlp_mult, mlp_split, cp)
    fwd = gemm_time(gemms, peak)
    elem_bytes = 2 * b * s / cp * (16 * m.d_model / (tp if sp else 1)
                                   + 4 * m.ffn_dim * mlp_mult / tp)
    fwd += elem_bytes / (hw.hbm_gbps * 1e9)
    total = 3 * fwd
    if recompute == "full":
        total += fwd
    elif recompute == "selective":
        total += gemm_time(gemms[-2:], peak)
    return total


def logits_time(m: ModelConfig, b: int, s: int, tp: int, hw: Hardware, cp: int = 1) -> float:
    """Forward + backward of the vocab-parallel output projection for one microbatch (this GPU's
    s/cp tokens under context parallelism)."""
    f = 2 * b * s / cp * m.vocab_size * m.d_model / tp
    return 3 * f / (gemm_efficiency(f) * hw.peak_tflops * 1e12)


def bubble_slots(schedule: str, pp: int, virtual_stages: int = 1) -> float:
    """Idle time of a pipeline step in units of one microbatch's stage time (Narayanan Sec. 2.2):
    (p - 1) for GPipe and 1F1B, (p - 1) / v for interleaved 1F1B. Zero bubble: Qi et al. 2023
    ("Zero Bubble Pipeline Parallelism") reach ~0 only with ZB-H2, which holds about twice
    1F1B's activations; we model ZB-H1, whose peak memory equals 1F1B's (what
    `memory.inflight_layers` assumes) and whose bubble is about a third of 1F1B's."""
    if pp == 1:
        return 0.0
    if schedule == "interleaved_1f1b":
        return (pp - 1) / virtual_stages
    if schedule == "zero_bubble":
        return (pp - 1) / 3
    return float(pp - 1)
