"""Cross-field validation of a `Config`: the rules no single field's type or range expresses.

`validate(cfg, world_size)` runs one rule per section or topic, in a fixed order (the first
broken rule is the error a user sees): the model's shape, its architecture variants, training
lengths and the optimizer, MoE, the parallel layout (`ParallelDims`, layout.py) and the batch
split, expert parallelism, the pipeline, the DeepSpeed engine, tensor and context parallelism,
offloading,
activation checkpointing, switches this build does not run, the loss, data and checkpoint
resumption. Each raises a one-line `ConfigError`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from llmtrain.config.errors import ConfigError, short
from llmtrain.config.layout import ParallelDims, pipeline_split_problem
from llmtrain.config.schema import GLU_ACTIVATIONS, Config


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every rule below, in order; a ConfigError names the first that `cfg` breaks on
    `world_size` ranks."""
    p = cfg.parallel
    _model_shape(cfg)
    _variants(cfg)
    _long_context(cfg)
    _mup(cfg)
    _lengths_and_optim(cfg)
    _moe(cfg)
    dims = ParallelDims.from_config(cfg, world_size)
    _batch(cfg, dims)
    if p.ep > 1:
        _expert_parallel(cfg, dims)
    if p.pp > 1:
        _pipeline(cfg, dims)
    if p.engine == "deepspeed":
        _deepspeed(cfg)
    _tensor_parallel(cfg)
    if p.cp > 1:
        _context_parallel(cfg)
    _offload(cfg)
    _checkpointing(cfg)
    _unsupported(cfg)
    _loss(cfg)
    _data(cfg)
    _resume(cfg)


def _divisors(n: int) -> str:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]  # n may be 2**24
    return ", ".join(str(d) for d in sorted({*small, *(n // d for d in small)}))


def _model_shape(cfg: Config) -> None:
    """Heads, head dim and the encoder-decoder architecture's layers and positions."""
    m, p = cfg.model, cfg.parallel
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
                          f"use one of {_divisors(m.d_model)}")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.kv_heads} does not divide model.n_heads="
                          f"{m.n_heads}; use one of {_divisors(m.n_heads)}")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"position=rope needs an even head dim, got model.d_model/model.n_heads"
                          f"={m.head_dim}")
    if m.arch == "encoder_decoder":
        for key in ("n_encoder_layers", "n_decoder_layers"):
            if getattr(m, key) < 1:
                raise ConfigError(f"model.arch=encoder_decoder needs model.{key} >= 1, got "
                                  f"{getattr(m, key)}")
        if p.pp > 1:
            raise ConfigError(f"parallel.pp={p.pp} with model.arch=encoder_decoder is not "
                              f"supported; use pp=1")
        if p.tp > 1 and p.sequence_parallel:
            raise ConfigError(f"parallel.sequence_parallel with model.arch=encoder_decoder is not "
                              f"supported yet (parallel.tp={p.tp} works without it); use false")
    elif m.position in ("sinusoidal", "t5_relative"):
        raise ConfigError(f"model.position={m.position} is implemented for "
                          f"model.arch=encoder_decoder only; use rope, learned or none")


def _variants(cfg: Config) -> None:
    """The architecture variants (model.mixer, residual, init, ...) and what they compose with."""
    m, p = cfg.model, cfg.parallel
    variants = {"mixer": (m.mixer, "attention"), "residual": (m.residual, "standard"),
                "init": (m.init, "default"), "ln_scaling": (m.ln_scaling, "none"),
                "embedding_dim": (m.embedding_dim, None), "share_layers": (m.share_layers, False),
                "output": (m.output, "softmax"), "qk_norm": (m.qk_norm, False),
                "value_residual": (m.value_residual, False),
                "logit_softcap": (m.logit_softcap, 0.0)}
    changed = [f"model.{k}={v}" for k, (v, default) in variants.items() if v != default]
    if m.activation in ("polynorm", "polyrelu"):  # their coefficients: decoder blocks only
        changed.append(f"model.activation={m.activation}")
    if m.arch != "decoder" and changed:
        raise ConfigError(f"{changed[0]} is implemented for model.arch=decoder only; leave it at "
                          f"its default for model.arch={m.arch}")
    if m.norm == "none" and m.norm_position != "pre":
        raise ConfigError(f"model.norm=none needs model.norm_position=pre (without a norm the "
                          f"placements are the plain residual x + f(x)); got {m.norm_position}")
    if m.residual == "rezero" and m.norm_position != "pre":
        raise ConfigError(f"model.residual=rezero needs model.norm_position=pre (x + alpha * "
                          f"f(norm(x))); got {m.norm_position}")
    if m.init == "fixup" and m.norm != "none":
        raise ConfigError(f"model.init=fixup is an initialisation for models without "
                          f"normalisation; set model.norm=none (got {m.norm})")
    if m.ln_scaling != "none" and (m.norm == "none" or m.norm_position != "pre"):
        raise ConfigError(f"model.ln_scaling={m.ln_scaling} scales pre-LN outputs; needs "
                          f"model.norm_position=pre and a norm (got {m.norm_position}, {m.norm})")
    if m.embedding_dim is not None and m.embedding_dim >= m.d_model:
        raise ConfigError(f"model.embedding_dim={m.embedding_dim} must be below model.d_model="
                          f"{m.d_model} (ALBERT's factorised embedding) or null")
    if m.share_layers and (m.moe.num_experts or m.ln_scaling != "none"):
        raise ConfigError("model.share_layers=true cannot be combined with model.moe.num_experts "
                          "> 0 or model.ln_scaling (both differ per layer); use one of them")
    if m.moe.num_experts and m.activation in ("relu", "silu", "elu", "selu", "polynorm",
                                              "polyrelu"):
        raise ConfigError(f"model.activation={m.activation} is not implemented for MoE experts; "
                          f"use gelu, glu, reglu, geglu or swiglu")
    for key, what in (("qk_norm", "normalises attention queries and keys"),
                      ("value_residual", "mixes attention values")):
        if getattr(m, key) and m.mixer != "attention":
            raise ConfigError(f"model.{key}=true {what}; it needs model.mixer=attention, got "
                              f"{m.mixer}")
    if p.pp > 1:
        bad = [c for c in changed if c.split("=")[0] in
               ("model.share_layers", "model.embedding_dim", "model.output",
                "model.value_residual")]
        if bad:
            raise ConfigError(f"{bad[0]} with parallel.pp={p.pp} is not supported (pipeline "
                              f"stages split layers and embeddings, and the first layer's "
                              f"values would have to travel with the activations); use pp=1")
    if p.tp > 1:
        bad = changed + (["model.norm=none"] if m.norm == "none" else [])
        bad = [c for c in bad if not c.startswith(("model.init=", "model.ln_scaling="))]
        if m.qk_norm and m.kv_heads % p.tp:
            raise ConfigError(f"model.qk_norm=true with parallel.tp={p.tp} needs the kv heads "
                              f"split over tp (model.n_kv_heads={m.kv_heads} is kept whole on "
                              f"every rank); use tp=1")
        # QK-norm over this rank's heads: parallel/tensor.py (_replicate_over_heads)
        bad = [c for c in bad if not c.startswith("model.qk_norm=")]
        if bad:
            raise ConfigError(f"{bad[0]} with parallel.tp={p.tp} is not supported (the tensor-"
                              f"parallel plan follows the Llama module names); use tp=1")


def _mup(cfg: Config) -> None:
    """model.parametrization=mup (model/mup.py): its base width, and the variants whose own
    init, multipliers or optimizer groups it does not cover."""
    m = cfg.model
    if m.parametrization != "mup":
        if m.base_d_model is not None:
            raise ConfigError(f"model.base_d_model={m.base_d_model} is used by "
                              f"model.parametrization=mup only (got {m.parametrization}); set "
                              f"it to null or use parametrization=mup")
        return
    if m.base_d_model is None or m.base_d_model % m.n_heads:
        raise ConfigError(f"model.parametrization=mup needs model.base_d_model, the width the "
                          f"hyperparameters were tuned at, divisible by model.n_heads="
                          f"{m.n_heads} (got {m.base_d_model})")
    # (key, value, refused): sinusoidal positions multiply embeddings by sqrt(d_model), which
    # grows with width; deepnorm and fixup have their own init; DeepSpeed builds its own groups
    checks = [("model.moe.num_experts", m.moe.num_experts, m.moe.num_experts > 0),
              ("model.mixer", m.mixer, m.mixer != "attention"),
              ("model.output", m.output, m.output != "softmax"),
              ("model.embedding_dim", m.embedding_dim, m.embedding_dim is not None),
              ("model.init", m.init, m.init != "default"),
              ("model.position", m.position, m.position == "sinusoidal"),
              ("model.norm_position", m.norm_position, m.norm_position == "deepnorm"),
              ("parallel.engine", cfg.parallel.engine, cfg.parallel.engine == "deepspeed")]
    for key, value, refused in checks:
        if refused:
            raise ConfigError(f"{key}={value} with model.parametrization=mup is not supported "
                              f"(muP's init, multipliers and lr groups are written for dense "
                              f"attention models, model/mup.py); use "
                              f"parametrization=standard")


def _long_context(cfg: Config) -> None:
    """model.rope_scaling (model/rope.py) and the sliding window (model.attention_window,
    attention_global_every; model/transformer.py), both decoder-only."""
    m = cfg.model
    s = m.rope_scaling
    if s.type != "none":
        if m.position != "rope":
            raise ConfigError(f"model.rope_scaling.type={s.type} needs model.position=rope, got "
                              f"{m.position}; use rope_scaling.type=none")
        if s.type != "linear" and s.original_max_position_embeddings < 1:
            raise ConfigError(f"model.rope_scaling.type={s.type} needs model.rope_scaling."
                              f"original_max_position_embeddings (the pretraining length), got "
                              f"{s.original_max_position_embeddings}; set it >= 1")
        if s.type == "dynamic" and m.arch != "decoder":
            raise ConfigError(f"model.rope_scaling.type=dynamic is implemented for "
                              f"model.arch=decoder only, got {m.arch}; use linear, yarn or llama3")
        if s.type == "llama3" and s.high_freq_factor <= s.low_freq_factor:
            raise ConfigError(f"model.rope_scaling.high_freq_factor={s.high_freq_factor} must "
                              f"exceed low_freq_factor={s.low_freq_factor} (type=llama3)")
        if s.type == "yarn" and s.beta_fast < s.beta_slow:
            raise ConfigError(f"model.rope_scaling.beta_fast={s.beta_fast} must be >= "
                              f"beta_slow={s.beta_slow} (type=yarn)")
    if m.attention_global_every and not m.attention_window:
        raise ConfigError(f"model.attention_global_every={m.attention_global_every} needs "
                          f"model.attention_window > 0 (the local layers' window), got 0")
    if m.attention_window:
        if m.arch != "decoder" or m.mixer != "attention":
            what = f"arch={m.arch}" if m.arch != "decoder" else f"mixer={m.mixer}"
            raise ConfigError(f"model.attention_window={m.attention_window} is implemented for "
                              f"model.arch=decoder with mixer=attention, got model.{what}; "
                              f"use 0")
        if m.attention_global_every and m.share_layers:
            raise ConfigError(f"model.attention_global_every={m.attention_global_every} with "
                              f"model.share_layers=true is not supported (one shared block "
                              f"cannot alternate windows); use 0 or share_layers=false")


def _lengths_and_optim(cfg: Config) -> None:
    m, t, o = cfg.model, cfg.train, cfg.optim
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          f"use at most {m.max_seq_len} or raise model.max_seq_len")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} exceeds optim.lr={o.lr}")
    if o.muon_momentum >= 1.0:  # the momentum buffer would never see a gradient
        raise ConfigError(f"optim.muon_momentum={o.muon_momentum} must be below 1; use e.g. 0.95")
    if o.name == "muon" and cfg.parallel.engine == "deepspeed":
        # DeepSpeed's ZeRO optimizer flattens and partitions parameters across ranks, so no rank
        # holds a whole matrix to orthogonalise
        raise ConfigError("optim.name=muon with parallel.engine=deepspeed is not supported "
                          "(its ZeRO partitions split the matrices Muon orthogonalises); use "
                          "parallel.engine=torch")


def _moe(cfg: Config) -> None:
    moe = cfg.model.moe
    if moe.num_experts and moe.top_k > moe.num_experts:
        raise ConfigError(f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts="
                          f"{moe.num_experts}")
    if moe.num_experts and moe.router == "switch" and moe.top_k != 1:
        raise ConfigError(f"model.moe.router=switch routes top-1; got model.moe.top_k="
                          f"{moe.top_k}; use top_k=1 or router=topk")


def _batch(cfg: Config, dims: ParallelDims) -> None:
    """The global batch splits into micro-batches over the data-parallel ranks."""
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dims.dp):
        per_rank, rest = divmod(t.global_batch_size, dims.dp)
        if rest:
            near = _loadable_batches(t.global_batch_size, t.micro_batch_size, dims.dp)
            hint = (f"use a global batch divisible by the data-parallel size {dims.dp} that "
                    f"loads with this micro batch, e.g. {' or '.join(map(str, near))}")
        else:
            hint = (f"use a train.micro_batch_size dividing the {per_rank} sequences per "
                    f"data-parallel rank: one of {_divisors(per_rank)}")
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dims.dp}; "
            f"{hint}")


def _loadable_batches(batch: int, micro: int, dp: int) -> list[int]:
    """The nearest global batches below and above `batch` that split over `dp` ranks with
    micro batch `micro`: the multiples of micro x dp, and the multiples of dp below it (a rank's
    share is then under the micro batch, which loading.fit_micro_batch cuts to it)."""
    step = micro * dp

    def down(n: int, k: int) -> int:  # the largest multiple of k <= n
        return n // k * k

    def up(n: int, k: int) -> int:  # the smallest multiple of k >= n
        return -(-n // k) * k
    below = down(batch - 1, dp) if batch - 1 < step else down(batch - 1, step)
    above = up(batch + 1, dp) if batch + 1 <= step else up(batch + 1, step)
    return [n for n in (below, above) if n > 0]


def _expert_parallel(cfg: Config, dims: ParallelDims) -> None:
    """Rules of parallel.ep > 1 (parallel/expert.py: the ep ranks are data-parallel ranks)."""
    m, p = cfg.model, cfg.parallel
    e = m.moe.num_experts
    if not e:
        raise ConfigError(f"parallel.ep={p.ep} needs an MoE model (model.moe.num_experts > 0)")
    if e % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide model.moe.num_experts={e}; use "
                          f"one of {_divisors(e)}")
    if dims.dp_shard % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel shard size "
                          f"{dims.dp_shard} (expert-parallel ranks are data-parallel ranks)")
    if p.zero_stage == 1:
        _expert_zero1(cfg, dims)


def _expert_zero1(cfg: Config, dims: ParallelDims) -> None:
    """ZeRO-1 gives every expert weight one owner among the ranks holding the same experts: each
    of those ranks needs at least one expert tensor."""
    m, p = cfg.model, cfg.parallel
    per_layer = 3 if m.activation in GLU_ACTIVATIONS else 2

    def tensors_in(layer_ids) -> int:
        return per_layer * sum((i + 1) % m.moe.every_n_layers == 0 for i in layer_ids)
    if p.pp > 1:  # each stage partitions the experts of its own layers
        tensors = min([t for t in map(tensors_in, dims.stage_layers) if t] or [0])
    else:
        stacks = ((m.n_encoder_layers, m.n_decoder_layers) if m.arch == "encoder_decoder"
                  else (m.n_layers,))
        tensors = sum(tensors_in(range(n)) for n in stacks)
    replicas = dims.dp * dims.cp // p.ep  # parallel/expert.py build_ep_mesh: cp ranks too
    if 0 < tensors < replicas:
        where = " in the pipeline stage with the fewest" if p.pp > 1 else ""
        raise ConfigError(f"parallel.ep={p.ep} with zero_stage=1 splits the expert weights "
                          f"({tensors} tensors{where}) over the {replicas} ranks holding the "
                          f"same experts; each needs at least one: use zero_stage=0 or a "
                          f"larger ep")


def _pipeline(cfg: Config, dims: ParallelDims) -> None:
    """Rules of parallel.pp > 1 (parallel/pipeline.py splits the decoder by layer ranges)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    problem = pipeline_split_problem(cfg)
    if problem:
        raise ConfigError(problem)
    if p.pp_schedule == "interleaved_1f1b" and p.virtual_stages < 2:
        raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b needs parallel.virtual_stages "
                          f">= 2, got {p.virtual_stages}; use 1f1b or raise virtual_stages")
    if p.virtual_stages > 1 and p.pp_schedule not in ("interleaved_1f1b", "zero_bubble"):
        raise ConfigError(f"parallel.virtual_stages={p.virtual_stages} needs "
                          f"parallel.pp_schedule=interleaved_1f1b or zero_bubble, got "
                          f"{p.pp_schedule}")
    per_rank = t.global_batch_size // dims.dp
    n_mb = dims.pp_microbatches
    if per_rank % n_mb:
        raise ConfigError(f"parallel.pp_microbatches={p.pp_microbatches} does not divide the "
                          f"batch per data-parallel rank train.global_batch_size / dp = "
                          f"{per_rank}; use one of {_divisors(per_rank)}")
    if p.pp_schedule == "1f1b" and n_mb < p.pp:
        raise ConfigError(f"parallel.pp_schedule=1f1b needs at least parallel.pp={p.pp} "
                          f"micro-batches, got {n_mb} (parallel.pp_microbatches, 0 = "
                          f"global_batch_size / dp / micro_batch_size); raise it or use gpipe")
    if m.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true with parallel.pp > 1 is not supported (the "
                          "embedding and the output layer live on different stages); set "
                          "model.tie_embeddings=false")
    if cfg.data.reset_attention_at_eod:
        raise ConfigError("data.reset_attention_at_eod with parallel.pp > 1 is not supported "
                          "yet (document ids are not sent between stages); use pp=1")
    if p.sequence_parallel and p.tp > 1:
        raise ConfigError("parallel.sequence_parallel with parallel.pp > 1 is not supported yet "
                          "(stages would exchange sequence shards); set it to false")


def _deepspeed(cfg: Config) -> None:
    """Rules of parallel.engine=deepspeed: its ZeRO shards over every rank and knows nothing of
    our DTensor TP, pipeline stages or expert groups."""
    p = cfg.parallel
    bad = [f"{k}={v}" for k, v in (("tp", p.tp), ("pp", p.pp), ("ep", p.ep),
                                   ("dp_replicate", p.dp_replicate)) if v != 1]
    if bad:
        raise ConfigError(f"parallel.engine=deepspeed runs data parallelism (ZeRO) only; got "
                          f"parallel.{', parallel.'.join(bad)}; set them to 1 or use "
                          f"parallel.engine=torch")
    if p.offload != "none" and p.zero_stage == 0:
        raise ConfigError(f"parallel.offload={p.offload} with engine=deepspeed needs "
                          f"parallel.zero_stage=1, 2 or 3, got 0")


def _tensor_parallel(cfg: Config) -> None:
    """parallel.tp splits heads, kv heads, the vocabulary and the MLP; sequence parallelism
    also splits the sequence."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if m.n_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}; use "
                          f"{_divisors(m.n_heads)}")
    if m.kv_heads % p.tp and m.kv_heads != 1:
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.n_kv_heads={m.kv_heads}; use "
                          f"{_divisors(m.kv_heads)} (or n_kv_heads=1, whose kv head every tp rank "
                          f"keeps whole)")
    for key, n in (("model.vocab_size", m.vocab_size), ("model.d_ff", m.ffn_dim)):
        if n % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide {key}={n}; use one of "
                              f"{_divisors(n)}")
    if p.sequence_parallel and p.tp > 1 and t.seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel needs train.seq_len={t.seq_len} divisible "
                          f"by parallel.tp={p.tp}")
    if p.sequence_parallel and p.tp > 1 and m.position == "learned" and m.max_seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel with position=learned needs "
                          f"model.max_seq_len={m.max_seq_len} divisible by parallel.tp={p.tp}")
    if p.sequence_parallel and p.tp > 1 and m.position == "learned" and \
            cfg.data.reset_attention_at_eod:
        # positions restart per document: a [B, T] table lookup, which the sequence-parallel
        # plan of the position table ([T, D] output split along T) does not shard
        raise ConfigError("data.reset_attention_at_eod with position=learned and "
                          "parallel.sequence_parallel is not supported; use position=rope or "
                          "sequence_parallel=false")


def _context_parallel(cfg: Config) -> None:
    """parallel.cp splits every sequence over cp ranks and attention's heads by all-to-all
    (parallel/context.py): what that needs of the model and the other switches."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    cp = f"parallel.cp={p.cp}"
    why = {"model.arch=encoder_decoder": m.arch == "encoder_decoder",
           f"model.mixer={m.mixer}": m.mixer != "attention",  # only attention is swapped
           "model.position=t5_relative": m.position == "t5_relative",
           "parallel.engine=deepspeed": p.engine == "deepspeed",
           "parallel.compile=true": p.compile,  # not tested with the all-to-all in the graph
           # a cp rank learns the whole length from doc ids (data/loader.py), which pipeline
           # stages are not handed; dynamic NTK (an inference-time extension) would need a
           # dense mask for that alone
           f"parallel.pp={p.pp} and model.attention_window={m.attention_window}":
               p.pp > 1 and m.attention_window > 0,
           "model.rope_scaling.type=dynamic": m.rope_scaling.type == "dynamic"}
    bad = next((key for key, on in why.items() if on), None)
    if bad:
        raise ConfigError(f"{cp} with {bad} is not supported (context parallelism splits the "
                          f"sequences of a decoder's self-attention); use parallel.cp=1")
    sp = p.tp if p.sequence_parallel and p.tp > 1 else 1
    if t.seq_len % (p.cp * sp):
        by = f"parallel.cp={p.cp} x parallel.tp={p.tp} (sequence parallel)" if sp > 1 else cp
        raise ConfigError(f"train.seq_len={t.seq_len} is not divisible by {by}; use a multiple "
                          f"of {p.cp * sp}")
    if m.n_heads % (p.cp * p.tp):
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by {cp} x parallel.tp="
                          f"{p.tp} = {p.cp * p.tp} (each cp rank attends with its share of a tp "
                          f"rank's heads); use cp x tp in {_divisors(m.n_heads)}")


def _offload(cfg: Config) -> None:
    p = cfg.parallel
    if p.offload == "nvme" and p.engine != "deepspeed":
        raise ConfigError("parallel.offload=nvme needs parallel.engine=deepspeed; use none or cpu "
                          "with engine=torch")
    if p.offload == "cpu" and p.zero_stage != 3 and p.engine == "torch":
        raise ConfigError(f"parallel.offload=cpu needs parallel.zero_stage=3, got "
                          f"{p.zero_stage}")


def _checkpointing(cfg: Config) -> None:
    """Which blocks parallel.activation_checkpointing_every checkpoints."""
    m, p = cfg.model, cfg.parallel
    every = p.activation_checkpointing_every
    if every > 1 and p.activation_checkpointing == "none":
        raise ConfigError(f"parallel.activation_checkpointing_every={every} needs "
                          f"parallel.activation_checkpointing=selective or full, got none; set "
                          f"one or use every=1")
    blocks = (m.n_encoder_layers + m.n_decoder_layers if m.arch == "encoder_decoder"
              else 1 if m.share_layers else m.n_layers)
    if every > blocks:
        raise ConfigError(f"parallel.activation_checkpointing_every={every} exceeds the model's "
                          f"{blocks} blocks, so none would be checkpointed; use 1 to {blocks}")


def _unsupported(cfg: Config) -> None:
    """Switches this build does not run (yet)."""
    p = cfg.parallel
    if p.compile and p.engine == "deepspeed":
        # parallel/compile.py compiles the blocks inside parallelize()'s torch engine path;
        # deepspeed.initialize wraps the model in its own engine (which has its own compile)
        raise ConfigError("parallel.compile=true with parallel.engine=deepspeed is not "
                          "supported (torch.compile per block is applied by the torch engine); "
                          "use parallel.engine=torch or compile=false")
    if p.compile and p.tp > 1 and cfg.model.moe.num_experts:
        # measured (torch 2.13, 2 gloo ranks, top-2 of 4 experts): losses equal eager's, but the
        # graphs around the eager expert dispatch recompile in every step (dynamo hit its
        # recompile_limit of 8 by step 5), each costing as much as the first compile
        raise ConfigError(f"parallel.compile=true with parallel.tp={p.tp} and "
                          f"model.moe.num_experts={cfg.model.moe.num_experts} is not supported "
                          f"(the MoE blocks recompile every step under tensor parallelism); use "
                          f"parallel.tp=1, a dense model or compile=false")
    if cfg.checkpoint.async_save and p.engine == "deepspeed":
        raise ConfigError("checkpoint.async=true is for parallel.engine=torch (DCP async_save); "
                          "the deepspeed engine writes its checkpoints synchronously: use false")


def _loss(cfg: Config) -> None:
    """train.loss=chunked or fused (train/lean_loss.py) is wired into the torch engine's
    TrainStep for a decoder whose output is one softmax layer (plain, DDP, FSDP, tensor
    parallel)."""
    m, p = cfg.model, cfg.parallel
    bad = [key for key, on in (("model.arch=encoder_decoder", m.arch == "encoder_decoder"),
                               ("model.output=mos", m.output == "mos"),
                               (f"parallel.pp={p.pp}", p.pp > 1),
                               ("parallel.engine=deepspeed", p.engine == "deepspeed")) if on]
    if cfg.train.loss != "plain" and bad:
        raise ConfigError(f"train.loss={cfg.train.loss} with {bad[0]} is not supported (it "
                          f"fuses the decoder's softmax output layer in the torch engine's "
                          f"step); use train.loss=plain")


def _data(cfg: Config) -> None:
    """Sequence-to-sequence fields, blend entries and the paths a source needs."""
    d = cfg.data
    if d.source_field or d.target_field:
        if not (d.source_field and d.target_field):
            raise ConfigError(f"data.source_field={short(d.source_field)} and data.target_field="
                              f"{short(d.target_field)}: the sequence-to-sequence objective needs "
                              f"both")
        if cfg.model.arch != "encoder_decoder":
            raise ConfigError(f"data.source_field/target_field (sequence-to-sequence pairs) need "
                              f"model.arch=encoder_decoder, got {cfg.model.arch}")
        if d.source != "files" or d.blend:
            raise ConfigError(f"data.source_field/target_field read pairs from jsonl/parquet "
                              f"files: use data.source=files without data.blend (got "
                              f"data.source={d.source})")
    for i, entry in enumerate(d.blend or ()):
        if not _blend_entry_ok(entry):
            raise ConfigError(f"data.blend[{i}]={short(entry)} is not valid; each entry is "
                              f"[weight, path] with a finite weight >= 0")
    if d.source != "stdlib" and not d.paths:
        raise ConfigError(f"data.source={d.source} needs data.paths (files or prefixes)")
    _split(cfg)


# a share as megatron-core's split parser reads it (it takes every run of digits and dots)
SPLIT_SHARE = re.compile(r"[0-9]+\.?[0-9]*|\.[0-9]+")


def split_shares(split: str) -> list[float]:
    """data.split's training, validation and test shares (not normalised; missing ones 0), as
    megatron-core's `parse_and_normalize_split` reads them. Its parser takes every run of digits
    and dots for a number (it drops a minus sign, fails an assertion on a fourth share, divides
    by a zero sum), so the string is checked here first."""
    parts = [p.strip() for p in re.split(r"[,/]", split)]
    shares = [float(p) for p in parts if SPLIT_SHARE.fullmatch(p)]
    if len(shares) != len(parts) or len(parts) > 3 or not 0 < sum(shares) < math.inf:
        raise ConfigError(f"data.split={short(split)} is not 1 to 3 non-negative shares "
                          f"(training, validation, test) with a positive sum; use e.g. 98,2,0")
    return shares + [0.0] * (3 - len(shares))


def _split(cfg: Config) -> None:
    """data.split before any data is read (tokenizing a corpus may take hours): every run trains
    and evaluates (train.eval_steps >= 1), so both need a share."""
    shares = split_shares(cfg.data.split)
    for name, share in zip(("training", "validation"), shares):
        if share == 0:
            raise ConfigError(f"data.split={short(cfg.data.split)} gives the {name} split no "
                              f"share; every run trains and evaluates: use e.g. 98,2,0")


def _resume(cfg: Config) -> None:
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not _exists(resume):
        raise ConfigError(f"checkpoint.resume={short(resume)} is neither auto, none nor an "
                          f"existing checkpoint directory{_siblings(resume)}")


def _siblings(path: str) -> str:
    """'; its folder holds step_2, step_4' where the missing checkpoint's folder holds some (the
    newest five), for the message about a mistyped step."""
    try:
        names = [p.name for p in Path(path).parent.iterdir()
                 if p.name.startswith("step_") and p.name[5:].isdigit() and p.is_dir()]
    except (OSError, ValueError):
        return ""
    newest = sorted(names, key=lambda n: int(n[5:]))[-5:]
    return f"; its folder holds {', '.join(newest)}" if newest else ""


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long to look up, or with a NUL in it
        return False


def _blend_entry_ok(entry: list[Any]) -> bool:
    if len(entry) != 2 or not isinstance(entry[1], str) or isinstance(entry[0], bool):
        return False
    try:
        return math.isfinite(entry[0]) and entry[0] >= 0
    except (TypeError, OverflowError):
        return False
