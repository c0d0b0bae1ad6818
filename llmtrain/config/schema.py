"""The run configuration's schema: one dataclass per section, each field with its default and
(through `_f`) its valid range, read by loading.py when it builds a `Config` from YAML.

The dataclass defaults *are* the embedded default (`configs/tiny.yaml` spells the same values out;
a test keeps the two equal), and their order and values are hashed into every checkpoint
(`config_hash`): a field added, moved or given another default changes the hash of every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
       doc: str = "") -> Any:
    """A dataclass field with an optional numeric range [lo, hi] (or (lo, hi] with lo_open)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Upper bounds of the integers that size layers, buffers and loops. Each lies far beyond any real
# run (the largest published models have ~10**2 layers, d_model ~2**14, vocabularies ~2**18,
# contexts ~2**23 tokens, ~2**11 experts; jobs use ~10**5 GPUs and ~10**7 steps), so only a typo
# like 1e11 meets them, and it is refused before it sizes an allocation or a loop.
_LAYERS = 4096
_WIDTH = 2 ** 17  # d_model, embedding_dim
_HEADS = 2 ** 14
_FFN = 2 ** 20
_VOCAB = 2 ** 24
_TOKENS = 2 ** 24  # sequence lengths
_EXPERTS = 2 ** 16
_RANKS = 2 ** 20  # each degree of parallelism
_BATCH = 2 ** 24  # sequences per batch, micro-batches per step
_STEPS = 10 ** 10  # steps and step counts or intervals
_COUNT = 1024  # small counts: softmaxes mixed, data loader processes


@dataclass
class MoEConfig:
    num_experts: int = _f(0, lo=0, hi=_EXPERTS, doc="0 = dense FFN everywhere")
    top_k: int = _f(1, lo=1, hi=_EXPERTS)
    router: Literal["switch", "topk"] = "switch"
    # sizes each expert's buffer (capacity_factor * tokens / experts); >= num_experts keeps all
    capacity_factor: float = _f(1.25, lo=0.0, hi=_EXPERTS)
    aux_loss_coef: float = _f(0.01, lo=0.0)
    z_loss_coef: float = _f(0.001, lo=0.0)
    every_n_layers: int = _f(1, lo=1, hi=_LAYERS)
    n_shared_experts: int = _f(0, lo=0, hi=_EXPERTS)
    router_jitter: float = _f(0.0, lo=0.0, hi=1.0, doc="router input times U(1-eps, 1+eps)")
    aux_free_bias: bool = False  # DeepSeek-V3 aux-loss-free balancing (selection bias)
    bias_update_rate: float = _f(0.001, lo=0.0, doc="aux_free_bias step per update_bias()")


@dataclass
class RopeScalingConfig:
    """Rope frequencies for context extension, as Hugging Face's `rope_parameters` (model/rope.py
    has the formulas); type none = plain rope."""
    type: Literal["none", "linear", "dynamic", "yarn", "llama3"] = "none"
    factor: float = _f(1.0, lo=1.0, hi=_TOKENS, doc="context extension factor s")
    original_max_position_embeddings: int = _f(0, lo=0, hi=_TOKENS,
                                               doc="pretraining length L0 (dynamic, yarn, "
                                                   "llama3); 0 = unset")
    low_freq_factor: float = _f(1.0, lo=0.0, lo_open=True, doc="llama3")
    high_freq_factor: float = _f(4.0, lo=0.0, lo_open=True, doc="llama3")
    beta_fast: float = _f(32.0, lo=0.0, lo_open=True, doc="yarn: ramp end, in rotations")
    beta_slow: float = _f(1.0, lo=0.0, lo_open=True, doc="yarn: ramp start, in rotations")
    attention_factor: float | None = _f(None, lo=0.0, lo_open=True,
                                        doc="yarn: cos/sin scale; None = 0.1 ln(factor) + 1")


# Gated linear units (Shazeer 2020): activation(x W1) * (x W3). The one list of their names, which
# the model, the planner and the validator read (a copy that missed one under-counted its MLPs).
GLU_ACTIVATIONS = ("glu", "reglu", "geglu", "swiglu")


@dataclass
class ModelConfig:
    arch: Literal["decoder", "encoder_decoder"] = "decoder"
    n_layers: int = _f(4, lo=1, hi=_LAYERS)
    n_encoder_layers: int = _f(0, lo=0, hi=_LAYERS)
    n_decoder_layers: int = _f(0, lo=0, hi=_LAYERS)
    d_model: int = _f(128, lo=1, hi=_WIDTH)
    n_heads: int = _f(4, lo=1, hi=_HEADS)
    n_kv_heads: int | None = _f(None, lo=1, hi=_HEADS, doc="None = n_heads (MHA); 1 = MQA")
    d_ff: int | None = _f(None, lo=1, hi=_FFN,
                          doc="None = 4 * d_model (8/3 * d_model for GLU variants)")
    vocab_size: int = _f(4096, lo=2, hi=_VOCAB)
    max_seq_len: int = _f(256, lo=1, hi=_TOKENS)
    norm: Literal["layernorm", "rmsnorm", "none"] = "rmsnorm"
    norm_eps: float = _f(1e-5, lo=0.0, lo_open=True)
    norm_position: Literal["pre", "post", "deepnorm", "b2t"] = "pre"
    position: Literal["rope", "learned", "sinusoidal", "t5_relative", "none"] = "rope"
    rope_theta: float = _f(10000.0, lo=0.0, lo_open=True)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    attention_window: int = _f(0, lo=0, hi=_TOKENS,
                               doc="sliding window: token t attends to t-w+1..t; 0 = full")
    attention_global_every: int = _f(0, lo=0, hi=_LAYERS,
                                     doc="with a window, layers n-1, 2n-1, ... attend fully; "
                                         "0 = none")
    activation: Literal["relu", "gelu", "silu", "elu", "selu", "glu", "reglu", "geglu",
                        "swiglu", "polynorm", "polyrelu"] = "swiglu"
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = _f(0.0, lo=0.0, hi=1.0)
    init_std: float = _f(0.02, lo=0.0, lo_open=True)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # architecture variants (model/transformer.py, mixers.py, output.py; decoder-only)
    mixer: Literal["attention", "gmlp", "synthesizer_dense", "synthesizer_random",
                   "linear_attention"] = "attention"
    residual: Literal["standard", "rezero"] = "standard"
    init: Literal["default", "fixup"] = "default"
    ln_scaling: Literal["none", "inv_sqrt_depth"] = "none"
    embedding_dim: int | None = _f(None, lo=1, hi=_WIDTH,
                                   doc="None = d_model; < d_model: ALBERT factorised")
    share_layers: bool = False
    output: Literal["softmax", "mos"] = "softmax"
    mos_k: int = _f(4, lo=1, hi=_COUNT, doc="softmaxes mixed by output=mos")
    qk_norm: bool = _f(False, doc="RMSNorm on each head's queries and keys before rope (Qwen3)")
    value_residual: bool = _f(False, doc="every layer's values averaged with the first layer's "
                              "(ResFormer, Zhou et al. 2024)")
    logit_softcap: float = _f(0.0, lo=0.0, doc="c > 0: output logits c * tanh(logits / c) "
                              "(Gemma 2); 0 = off")
    # Yang et al. 2022 (Tensor Programs V), model/mup.py: hyperparameters tuned at width
    # base_d_model transfer to d_model
    parametrization: Literal["standard", "mup"] = "standard"
    base_d_model: int | None = _f(None, lo=1, hi=_WIDTH,
                                  doc="mup: the width the hyperparameters were tuned at")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation in GLU_ACTIVATIONS:
            # Shazeer 2020 keeps parameters equal to a 4*d_model MLP: 2/3 * 4 * d_model, rounded up to 8
            return (int(8 * self.d_model / 3) + 7) // 8 * 8
        return 4 * self.d_model


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, lo=1, hi=_RANKS)
    dp_shard: int = _f(-1, lo=-1, hi=_RANKS, doc="-1 = all ranks left over by the other dimensions")
    tp: int = _f(1, lo=1, hi=_RANKS)
    pp: int = _f(1, lo=1, hi=_RANKS)
    ep: int = _f(1, lo=1, hi=_RANKS)
    cp: int = _f(1, lo=1, hi=_RANKS, doc="context parallel: each sequence split over cp ranks")
    zero_stage: int = _f(0, lo=0, hi=3)
    sequence_parallel: bool = False
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    pp_microbatches: int = _f(0, lo=0, hi=_BATCH, doc="0 = global batch / micro batch")
    virtual_stages: int = _f(1, lo=1, hi=_LAYERS)
    pp_layers: list[int] | None = _f(None, hi=_LAYERS, doc="layers per stage (each item)")
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    activation_checkpointing_every: int = _f(1, lo=1, hi=_LAYERS,
                                             doc="checkpoint every N-th block only (blocks N-1, "
                                                 "2N-1, ...); the others keep all activations")
    compile: bool = False
    engine: Literal["torch", "deepspeed"] = "torch"
    offload: Literal["none", "cpu", "nvme"] = "none"
    deepspeed_config: str | None = None


@dataclass
class TrainConfig:
    steps: int = _f(300, lo=1, hi=_STEPS)
    global_batch_size: int = _f(16, lo=1, hi=_BATCH,
                                doc="sequences per optimizer step, all ranks together")
    micro_batch_size: int = _f(16, lo=1, hi=_BATCH, doc="sequences per forward pass on one rank")
    seq_len: int = _f(128, lo=2, hi=_TOKENS)
    precision: Literal["fp32", "bf16", "bf16_pure"] = "fp32"
    grad_clip: float = _f(1.0, lo=0.0, doc="0 = no clipping")
    # torch generators take 64 bits and the data order seeds with seed * 1_000_003 + epoch
    seed: int = _f(1234, lo=0, hi=2 ** 32 - 1)
    eval_every: int = _f(50, lo=0, hi=_STEPS, doc="0 = only at the end")
    eval_steps: int = _f(8, lo=1, hi=_STEPS)
    log_every: int = _f(10, lo=1, hi=_STEPS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_skipped_steps: int = _f(10, lo=1, hi=_STEPS)
    # 10**7 s (116 days): datetime.timedelta and threading waits overflow near 10**9 s
    collective_timeout_s: float = _f(600.0, lo=0.0, lo_open=True, hi=10 ** 7)
    loss: Literal["plain", "chunked", "fused"] = _f(
        "plain", doc="chunked: output layer and cross entropy fused over token chunks, no "
        "[B, T, V] logits held, the logits recomputed in the backward; fused: the same with the "
        "gradients computed in the forward, no recomputation, one fp32 output-weight-sized "
        "buffer held until the backward (train/lean_loss.py)")
    loss_chunk_tokens: int = _f(1024, lo=1, hi=_TOKENS,
                                doc="tokens per chunk of train.loss=chunked or fused")


@dataclass
class OptimConfig:
    lr: float = _f(3e-3, lo=0.0, lo_open=True)
    min_lr: float = _f(3e-4, lo=0.0)
    weight_decay: float = _f(0.1, lo=0.0)
    beta1: float = _f(0.9, lo=0.0, hi=1.0)
    beta2: float = _f(0.95, lo=0.0, hi=1.0)
    eps: float = _f(1e-8, lo=0.0, lo_open=True)
    warmup_steps: int = _f(30, lo=0, hi=_STEPS)
    schedule: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd", "noam"] = "cosine"
    decay_steps: int | None = _f(None, lo=0, hi=_STEPS,
                                 doc="wsd: length of the final decay; others: steps from end of "
                                     "warmup to min_lr (None = until train.steps)")
    name: Literal["adamw", "muon"] = _f(
        "adamw", doc="muon: Muon on the hidden matrices, AdamW on embeddings, output, norms, "
                     "biases and routers (train/optim.py is_muon_param)")
    muon_lr: float | None = _f(None, lo=0.0, lo_open=True,
                               doc="Muon's peak lr (None = optim.lr; the update is scaled to "
                                   "AdamW's RMS, Liu et al. 2025); follows optim.schedule")
    muon_momentum: float = _f(0.95, lo=0.0, hi=1.0, doc="Muon's momentum mu (< 1)")
    muon_weight_decay: float | None = _f(None, lo=0.0, doc="None = optim.weight_decay")
    muon_nesterov: bool = True
    muon_ns_steps: int = _f(5, lo=1, hi=99, doc="Newton-Schulz iterations (torch's limit: 99)")
    muon_ns_dtype: Literal["bfloat16", "float32"] = _f(
        "bfloat16", doc="Newton-Schulz's dtype: bfloat16 = torch.optim.Muon's; float32 on CPUs "
                        "without bf16 matrix units (~50x faster there)")


@dataclass
class DataConfig:
    source: Literal["stdlib", "files", "indexed"] = "stdlib"
    paths: list[str] = _f([], doc="files/globs for source=files; .bin/.idx prefixes for indexed")
    blend: list[list[Any]] | None = None
    tokenizer: str | None = _f(None, doc="tokenizer.json or HF tokenizer dir; None = train BPE")
    split: str = "98,2,0"
    num_workers: int = _f(0, lo=0, hi=_COUNT)
    text_field: str = "text"
    cache_dir: str | None = _f(None, doc="None = $LLMTRAIN_CACHE or ~/.cache/llmtrain")
    reset_attention_at_eod: bool = _f(False, doc="attend within each packed document only, "
                                      "positions restarting at each (reset_position_ids)")
    mask_eod_loss: bool = False
    source_field: str | None = None
    target_field: str | None = None
    skip_bad_lines: bool = _f(False, doc="skip malformed jsonl lines / non-UTF-8 text with a "
                              "counted warning instead of stopping on the first")


@dataclass
class CheckpointConfig:
    dir: str | None = _f(None, doc="None = <run_dir>/checkpoints")
    every: int = _f(100, lo=0, hi=_STEPS, doc="0 = only at the end")
    keep_last: int = _f(2, lo=0, hi=_STEPS, doc="0 = keep all")
    resume: str = _f("auto", doc="auto | none | PATH")
    async_save: bool = _f(False, doc="YAML key checkpoint.async: periodic saves are written "
                          "in the background (DCP async_save); the final save is synchronous")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/tiny"
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

