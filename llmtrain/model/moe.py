"""Mixture-of-Experts feed-forward layer: a router sends each token to k of E expert MLPs.

    y(x) = sum_{i in chosen(x), kept} g_i(x) * expert_i(x)  +  shared(x)

Routers (`model.moe.router`):
  switch  top-1, gate g = p_i (Fedus et al. 2021, "Switch Transformers").
  topk    top-k; for k > 1 the gates are renormalised over the chosen k, g_i = p_i / sum_chosen p_j
          (GShard, Lepikhin et al. 2020; Mixtral). For k = 1 the gate stays p_i: renormalising one
          gate makes it 1 and cuts the router off from the language-model loss. So topk with k = 1
          is the switch router.
Router logits and probabilities are computed in fp32 (autocast off), as Switch recommends.

Tokens and capacity. The N tokens of one forward call (this rank's micro-batch, B*T flattened
batch-major) make k*N assignments. Each expert takes at most C = ceil(capacity_factor * k * N / E)
of them (Switch eq. 3 with k = 1; capacity_factor <= 0: no limit). Assignments are served in
priority order "choice-major": every token's first choice in sequence order, then every second
choice, ... -- first come first served as in Switch, first choices before second choices as in
GShard. An assignment over capacity is dropped: it adds 0, so a token whose choices all overflow
leaves the layer as 0 (plus the shared experts) and is carried by the residual connection.

Losses (summed over layers by `aux_loss(model)`; the training loop adds them to the loss):
  load balance  aux_loss_coef * E * sum_i f_i P_i  (Switch eq. 4), f_i = fraction of the k*N
                assignments routed to expert i before dropping (sums to 1, so the loss is
                aux_loss_coef at perfect balance for any k), P_i = mean router probability of i.
  router z-loss z_loss_coef * mean_tokens(logsumexp(logits)^2)  (Zoph et al. 2022, "ST-MoE" eq. 5).
Jitter (Switch): in training the router input is multiplied by U(1 - eps, 1 + eps) noise.
Aux-loss-free balancing (DeepSeek-V3, Liu et al. 2024, sec. 2.1.2): a per-expert bias is added to
the routing scores for *selection only* (gates still use p_i); `update_bias()` moves it by
rate * sign(mean load - load) outside autograd after each optimizer step.

Experts are GeLU or GLU MLPs (`model.activation`) of hidden width `model.ffn_dim` (the dense
FFN's width: E experts hold E times the dense FFN parameters), without biases, held as stacked
weights w1 [E, d, f], w3 [E, d, f], w2 [E, f, d] so that one grouped matmul runs all experts on
the expert-sorted tokens. Shared experts (DeepSeekMoE, Dai et al. 2024) see every token; n of
them of width f are one FeedForward of width n*f (the same function).
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from llmtrain.config import ModelConfig
from llmtrain.model.mlp import GLU_ACTIVATIONS, FeedForward


@functools.cache
def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (CUDA needs sm90+ and bf16; the
    CPU kernel exists in recent torch). Probed once per device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        # The first probe often runs inside an activation-checkpointed forward. Its own
        # saved_tensors_hooks: full checkpointing's would count the probe's saved tensors and
        # then miss them in the recompute (CheckpointError). No dispatch modes: selective
        # checkpointing's would keep the probe's outputs and replay them in the recompute, which
        # runs no probe, shifting every later output. No random numbers: the forward would draw
        # them and the recompute not, so its dropout masks would differ.
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
                _disable_current_modes():
            x = torch.ones(32, 16, device=device, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
            y = torch._grouped_mm(x, w, offs=offs)
            y.backward(torch.ones_like(y))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class GroupedExperts(nn.Module):
    """E expert MLPs as stacked weights. forward(x, counts): x [M, d] holds the tokens sorted by
    expert, counts[e] rows for expert e in order; returns each row through its expert, [M, d]."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str):
        super().__init__()
        if activation not in ("gelu", *GLU_ACTIVATIONS):
            raise ValueError(f"model.activation={activation!r} is not valid; "
                             f"use gelu, swiglu or geglu")
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w3 = (nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
                   if activation in GLU_ACTIVATIONS else None)
        self.impl = "auto"  # auto | grouped_mm | loop

    def _mlp(self, x, w1, w2, w3, mm):
        if w3 is None:
            return mm(F.gelu(mm(x, w1)), w2)
        return mm(GLU_ACTIVATIONS[self.activation](mm(x, w1)) * mm(x, w3), w2)

    def _use_grouped_mm(self, x: torch.Tensor, w1: torch.Tensor, dtype: torch.dtype) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        aligned = x.shape[-1] % 8 == 0 and w1.shape[-1] % 8 == 0  # 16-byte rows in bf16
        return aligned and _grouped_mm_works(x.device, dtype)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.run(x, counts, (self.w1, self.w2, self.w3))

    def run(self, x: torch.Tensor, counts: torch.Tensor, weights) -> torch.Tensor:
        """forward with the given (w1, w2, w3): len(counts) experts. The parallel/ subclasses
        pass this rank's shards: its experts under expert parallelism (parallel/expert.py), its
        hidden units of every expert under tensor parallelism (parallel/tensor.py)."""
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        if self._use_grouped_mm(x, weights[0], dtype):
            # one kernel for all experts; groups are the row ranges ending at offs
            offs = counts.cumsum(0).to(torch.int32)
            x = x.to(dtype)
            if x.shape[0] == 0:
                return x.new_zeros(0, weights[1].shape[-1])
            w1, w2, w3 = (None if w is None else w.to(dtype) for w in weights)
            return self._mlp(x, w1, w2, w3, functools.partial(torch._grouped_mm, offs=offs))
        # a loop over contiguous slices; unbind (not w[e]) so that the backward stacks the
        # per-expert gradients once instead of adding E full-size zero-padded ones
        per_expert = zip(*(w.unbind(0) if w is not None else [None] * len(counts)
                           for w in weights))
        ys = [self._mlp(xe, w1, w2, w3, torch.matmul)
              for xe, (w1, w2, w3), n in zip(x.split(counts.tolist()), per_expert, counts.tolist())
              if n]
        return torch.cat(ys) if ys else x.new_zeros(0, weights[1].shape[-1], dtype=dtype)


class Router(nn.Module):
    """Token -> k experts and their gates. Holds the aux-free selection bias and the load seen
    since its last update (both buffers)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool,
                 jitter: float = 0.0, aux_free_bias: bool = False, bias_update_rate: float = 0.0):
        super().__init__()
        self.top_k, self.renormalize, self.jitter = top_k, renormalize, jitter
        self.aux_free_bias, self.bias_update_rate = aux_free_bias, bias_update_rate
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=aux_free_bias)
        # integer, so that model.to(bfloat16) keeps the counts exact
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor):
        return self.route(x, self.gate.weight)

    def route(self, x: torch.Tensor, weight: torch.Tensor):
        """x [N, d] and the gate's weight [E, d] -> logits [N, E] (fp32), probs [N, E], experts
        [N, k], gates [N, k] (fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = F.linear(x, weight.float())
        probs = logits.softmax(dim=-1)
        scores = probs.detach() + self.expert_bias if self.aux_free_bias else probs.detach()
        experts = scores.topk(self.top_k, dim=-1).indices
        gates = probs.gather(-1, experts)
        if self.renormalize and self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, experts, gates

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """b_i += rate * sign(mean load - load_i) (DeepSeek-V3). `load` defaults to the tokens
        routed here in training since the last call; under data parallelism pass (or all-reduce
        into `self.load`) the global load so that every rank moves its bias the same way."""
        load = (self.load if load is None else load).float()
        if self.aux_free_bias:  # no load (nothing routed): sign(0) = 0, the bias stays
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()


class MoE(nn.Module):
    """Drop-in for FeedForward: [..., d] -> [..., d]. After each forward, `aux_loss` holds this
    layer's weighted balance + z loss (with grad) and `stats` its detached metrics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.num_experts = m.num_experts
        self.top_k = m.top_k if m.router == "topk" else 1
        self.capacity_factor = m.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = m.aux_loss_coef, m.z_loss_coef
        self.router = Router(cfg.d_model, m.num_experts, self.top_k, m.router == "topk",
                             m.router_jitter, m.aux_free_bias, m.bias_update_rate)
        self.experts = GroupedExperts(m.num_experts, cfg.d_model, cfg.ffn_dim, cfg.activation)
        self.shared_experts = (FeedForward(cfg.d_model, m.n_shared_experts * cfg.ffn_dim,
                                           cfg.activation, cfg.bias)
                               if m.n_shared_experts else None)
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments one expert may take from `n_tokens` tokens; None = unlimited."""
        if self.capacity_factor <= 0:
            return None
        return math.ceil(self.capacity_factor * self.top_k * n_tokens / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n, k, n_exp = x.shape[0], self.top_k, self.num_experts
        logits, probs, experts, gates = self.router(x)

        # assignments in priority order (choice-major), then stably sorted by expert
        flat_expert = experts.t().reshape(-1)
        flat_gate = gates.t().reshape(-1)
        flat_token = torch.arange(n, device=x.device).repeat(k)
        counts = torch.bincount(flat_expert, minlength=n_exp)
        order = torch.argsort(flat_expert, stable=True)
        cap = self.capacity(n)
        kept = counts
        if cap is not None:
            first = counts.cumsum(0) - counts  # where each expert's run starts in `order`
            rank_in_expert = torch.arange(k * n, device=x.device) - first[flat_expert[order]]
            order = order[rank_in_expert < cap]
            kept = counts.clamp(max=cap)
        token = flat_token[order]
        y = self.experts(x[token], kept)
        out = torch.zeros_like(x).index_add_(0, token, (y.float() * flat_gate[order, None])
                                             .to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        # Switch eq. 4 and ST-MoE eq. 5
        balance = n_exp * (counts.float() / (k * n) * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z
        if self.training and torch.is_grad_enabled():
            # a forward no backward follows is not a training step's
            self.router.load += counts
        self.stats = {"aux_loss": balance.detach(), "z_loss": z.detach(),
                      "drop_frac": 1 - kept.sum().float() / (k * n),
                      "load_max_over_mean": counts.max().float() / counts.float().mean(),
                      "load": counts.detach()}
        return out.reshape(shape)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Router normal(0, std); experts as the dense FFN: w1, w3 normal(0, std), w2 (the
        residual projection) normal(0, out_std); shared experts likewise."""
        nn.init.normal_(self.router.gate.weight, 0.0, std)
        self.router.expert_bias.zero_()
        self.router.load.zero_()
        e = self.experts
        for w, s in ((e.w1, std), (e.w3, std), (e.w2, out_std)):
            if w is not None:
                nn.init.normal_(w, 0.0, s)
        f = self.shared_experts
        if f is not None:
            for linear, s in ((f.w1, std), (f.w3, std), (f.w2, out_std)):
                if linear is not None:
                    nn.init.normal_(linear.weight, 0.0, s)
                    if linear.bias is not None:
                        nn.init.zeros_(linear.bias)

    def inactive_params(self) -> int:
        """Expert parameters a token does not use: E - k of the E experts."""
        per_expert = sum(w.numel() for w in (self.experts.w1, self.experts.w2, self.experts.w3)
                         if w is not None) // self.num_experts
        return (self.num_experts - self.top_k) * per_expert


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The MoE layers of `model` by module name (also through DDP/FSDP/compile wrappers)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted balance and z losses of every MoE layer's last forward (None if the
    model has no MoE layer)."""
    losses = [m.aux_loss for m in moe_layers(model).values() if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_stats(model: nn.Module) -> dict[str, dict[str, float | list[int]]]:
    """Per MoE layer (keyed by module name): aux_loss and z_loss (unweighted; 1.0 is a perfectly
    balanced aux_loss), drop_frac, load_max_over_mean and load (tokens routed per expert, before
    dropping) of the last forward."""
    out = {}
    for name, m in moe_layers(model).items():
        if m.stats:
            out[name] = {k: (v.tolist() if k == "load" else float(v)) for k, v in m.stats.items()}
    return out


def moe_metrics(model: nn.Module) -> tuple[dict[str, float | list[int]], dict[str, torch.Tensor]]:
    """moe_stats flattened for a metrics record: ({"moe/layer<i>/<stat>": value}, the load
    histograms {"moe/layer<i>/load": counts}). Empty for a dense model."""
    record, histograms = {}, {}
    for name, stats in moe_stats(model).items():
        layer = re.search(r"layers\.(\d+)\.", f"{name}.")
        prefix = f"moe/layer{layer.group(1)}" if layer else f"moe/{name}"
        record.update({f"{prefix}/{k}": v for k, v in stats.items()})
        histograms[f"{prefix}/load"] = torch.tensor(stats["load"])
    return record, histograms


def update_bias(model: nn.Module) -> None:
    """After an optimizer step: move every aux-free router bias by its accumulated load."""
    for m in moe_layers(model).values():
        m.router.update_bias()
