"""Maximal update parametrization, `model.parametrization: mup` (Yang et al. 2022, "Tensor
Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer", Table 3 and its
equivalent form Table 8, Adam column). Hyperparameters tuned at width `base_d_model` carry over
to width d_model: every rule is written with the width multiplier m = d_model / base_d_model, so
that at m = 1 a muP model is the standard one, bit for bit.

Parameters fall into the paper's three classes plus vectors (`role`):

  class            which here                              init std          Adam lr  multiplier
  input weights    token/position embeddings, T5 relative  init_std          lr       1
                   bias table (fan_in: vocabulary, finite)
  hidden weights   every matrix inside a layer (q, k, v,   init_std/sqrt(m)  lr / m   1
                   o, FFN, cross-attention)                (var ~ 1/fan_in)
  output weights   `output` (the readout)                  init_std          lr       1/m
  vectors          biases, norm gains, ReZero's alpha      zeros/ones        lr       1

Output: Table 8's form (init variance constant in width, forward multiplier 1/fan_in, Adam lr
unchanged), which is Table 3's (variance 1/fan_in^2, Adam lr / fan_in) written with a multiplier;
the multiplier 1/m is applied to the readout's input (the readout is linear and bias-free, so
W (h / m) = (W h) / m and its gradient are the logits' multiplier exactly). Tied embeddings: under
Table 8 input and output weights have the same init and Adam lr, so one shared matrix satisfies
both rules; the output multiplier still applies, to the logits only (not to the embedding
lookup). Attention: scores q k^T / d_head instead of / sqrt(d_head) (TP V, section 4: once
trained, q and k are correlated, so their dot product grows like d_head, not sqrt(d_head)), times
sqrt(base_head_dim) so that the base width keeps 1/sqrt(d_head); base_head_dim =
base_d_model / n_heads, i.e. the head count stays fixed and head_dim grows with the width.

Muon (optim.name: muon) on a hidden matrix: the update is orthogonalised (singular values ~1)
and train/optim.py scales it by 0.2 sqrt(max(fan_out, fan_in)) ("match_rms_adamw", Liu et al.
2025), so at a fixed lr its spectral norm grows like sqrt(m). The spectral condition for feature
learning (Yang, Simon & Bernstein 2023, "A Spectral Condition for Feature Learning", condition 1)
wants ||Delta W||_* = Theta(sqrt(fan_out / fan_in)), Theta(1) for a hidden matrix whose two
dimensions both grow with m: hence Muon's lr x 1/sqrt(m) there (1 at m = 1: the standard Muon
run). The input, output and vector parameters stay on AdamW with the table's rules.

Every rule is a function of the parameter's name and the config (never of a local shard's shape),
so every layout gives each parameter the same multiplier.
"""

from __future__ import annotations

import math

# module names of the input weights (Table 3's "input weights": fan_in finite, fan_out = width)
_INPUT = ("tok_embeddings", "pos_embeddings", "relative_attention_bias")
# wrappers that parallelize() may insert into parameter names (DDP, torch.compile, activation
# checkpointing); they are not part of the model's own names
_WRAPPERS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def is_mup(model_cfg) -> bool:
    return getattr(model_cfg, "parametrization", "standard") == "mup"


def width_multiplier(model_cfg) -> float:
    """m = d_model / base_d_model under muP; 1 under the standard parametrization."""
    if not is_mup(model_cfg):
        return 1.0
    return model_cfg.d_model / model_cfg.base_d_model


def role(name: str, ndim: int) -> str:
    """"input", "hidden", "output" or "vector" (module docstring) for parameter FQN `name` with
    `ndim` dimensions (the full tensor's, the same on every layout)."""
    parts = [p for p in name.split(".") if p not in _WRAPPERS]
    if ndim < 2:
        return "vector"
    if any(p in _INPUT for p in parts):
        return "input"
    if len(parts) >= 2 and parts[-2] == "output" and "layers" not in parts:
        return "output"
    return "hidden"


def lr_multiplier(name: str, shape, cfg, muon: bool = False) -> tuple[float, str]:
    """(multiplier of the lr, why) for parameter `name` of full shape `shape` under run config
    `cfg`. `muon`: Muon steps it (train/optim.py `is_muon_param`; the multiplier is then of
    Muon's lr). AdamW (TP V Table 3/8, Adam column): hidden matrices 1/m; input and output
    weights and vectors 1. Muon on a hidden matrix: 1/sqrt(m) (module docstring). Standard: 1."""
    if not is_mup(cfg.model):
        return 1.0, "standard"
    r = role(name, len(shape))
    if r != "hidden":
        return 1.0, f"mup {r}: lr"
    m = width_multiplier(cfg.model)
    if muon:
        return 1.0 / math.sqrt(m), f"mup hidden, muon: lr / sqrt(m), m={m:g}"
    return 1.0 / m, f"mup hidden: lr / m, m={m:g}"


def hidden_std(model_cfg, std: float) -> float:
    """Init std of a hidden matrix: std at the base width, variance ~ 1/fan_in (Table 3)."""
    return std / math.sqrt(width_multiplier(model_cfg))


def output_multiplier(model_cfg) -> float:
    """The readout's forward multiplier 1/m (Table 8); 1 under the standard parametrization."""
    return 1.0 / width_multiplier(model_cfg)


def attention_scale(model_cfg) -> float | None:
    """SDPA's `scale`: sqrt(base_head_dim) / head_dim under muP (module docstring); None (SDPA's
    default 1/sqrt(head_dim)) under the standard parametrization."""
    if not is_mup(model_cfg):
        return None
    return math.sqrt(model_cfg.base_d_model / model_cfg.n_heads) / model_cfg.head_dim
