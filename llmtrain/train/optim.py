"""AdamW (or Muon on the hidden matrices, AdamW on the rest) with parameter groups, and
learning-rate schedules as a pure function of the step."""

from __future__ import annotations

import inspect
import math
import re

import torch
from torch import nn
# torch.optim.Muon's own Newton-Schulz iteration and shape rule (torch >= 2.9): `MuonAdamW`
# reuses them rather than copying their coefficients; what it adds is the step around them that
# torch's Muon cannot take (3-D expert stacks, sharded matrices, AdamW groups in one optimizer)
try:
    from torch.optim._muon import (DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr,
                                   _zeropower_via_newtonschulz)
except ImportError:  # torch < 2.9 (the package allows >= 2.6): optim.name=muon is refused
    _zeropower_via_newtonschulz = None

from llmtrain.config import Config, ConfigError, OptimConfig
from llmtrain.model.mup import lr_multiplier


def param_groups(model: nn.Module, weight_decay: float, cfg: Config | None = None,
                 skip: set[int] = frozenset()) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases and embeddings (GPT-3, Llama).
    With run config `cfg`, each group is split further by model/mup.py's `lr_multiplier` of
    (name, shape, cfg): a group whose multiplier is not 1 (muP's hidden matrices: 1/m) holds it
    as `lr_scale` (and starts at that lr), which train/step.py `set_lr` multiplies into every
    step's lr. Under the standard parametrization the groups are the two above, as before.
    Parameters whose id is in `skip` (Muon's, `optimizer_groups`) are left out."""
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    seen = set(skip)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embeddings" in name and "output" not in name
        decay = not (p.ndim < 2 or is_embedding)
        scale = 1.0 if cfg is None else lr_multiplier(name, p.shape, cfg)[0]
        groups.setdefault((decay, scale), []).append(p)
    out = []
    for (decay, scale), params in groups.items():
        name = ("decay" if decay else "no_decay") + ("" if scale == 1.0 else f"_lr{scale:g}")
        g = {"params": params, "weight_decay": weight_decay if decay else 0.0, "name": name}
        if scale != 1.0:
            g.update(lr_scale=scale, lr=cfg.optim.lr * scale)
        out.append(g)
    return out


# A parameter inside a transformer block (`layers.<i>.`, also under `encoder.`/`decoder.` or a
# DDP `module.` prefix).
_IN_BLOCK = re.compile(r"(^|\.)layers\.\d+\.")


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Whether `optim.name: muon` steps parameter `name` with Muon: the hidden matrices only,
    i.e. the 2-D weights of the linear maps inside the transformer blocks (attention q/k/v/o and
    cross-attention, MLP, the token mixers' projections) and the stacked [E, in, out] expert
    weights of an MoE layer, orthogonalised one expert at a time. Muon orthogonalises the update
    of a map from hidden vectors to hidden vectors (Jordan et al. 2024, "Muon: an optimizer for
    hidden layers"); everything else stays on AdamW, as Jordan et al. and Liu et al. 2025 ("Muon
    is scalable for LLM training") do: the token and position embeddings (lookup tables: one row
    per token, not a map of hidden vectors, and their sparse gradients have no useful spectrum),
    the output layer (hidden -> vocabulary logits; tied to the embedding here by default), norms
    and biases (vectors), the MoE routers (a d_model -> num_experts map whose few rows an
    orthogonalised update would force to equal norms, fighting the load balancing) and the
    Synthesizer's random attention logits (a parameter of attention weights, not a linear map).
    The one rule that splits the parameters: muP's per-parameter rules key on it too."""
    parts = name.split(".")
    if not _IN_BLOCK.search(name) or "router" in parts:
        return False
    if len(parts) >= 2 and parts[-2] == "experts":
        return p.ndim == 3
    return p.ndim == 2


def optimizer_groups(model: nn.Module, o: OptimConfig, cfg: Config | None = None) -> list[dict]:
    """`param_groups` (muP's lr multipliers with run config `cfg`); with `optim.name: muon`, first
    the group "muon" of the `is_muon_param` matrices (weight decay optim.muon_weight_decay,
    learning rate optim.muon_lr through its `lr_scale`: the schedule sets every group's lr),
    split like `param_groups` by model/mup.py's `lr_multiplier` for Muon (muP: 1/sqrt(m),
    group "muon_lr<x>"), then the AdamW groups of the rest."""
    if o.name != "muon":
        return param_groups(model, o.weight_decay, cfg)
    muon: dict[float, list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen and is_muon_param(name, p):
            scale = 1.0 if cfg is None else lr_multiplier(name, p.shape, cfg, muon=True)[0]
            muon.setdefault(scale, []).append(p)
        seen.add(id(p))
    wd = o.weight_decay if o.muon_weight_decay is None else o.muon_weight_decay
    base = 1.0 if o.muon_lr is None else o.muon_lr / o.lr
    # every group says which it is: ZeroRedundancyOptimizer fills a key a group lacks from its
    # first group's
    adamw = [{**g, "muon": False, "lr_scale": g.get("lr_scale", 1.0)}
             for g in param_groups(model, o.weight_decay, cfg,
                                   {id(p) for ps in muon.values() for p in ps})]
    return [{"params": params, "muon": True, "weight_decay": wd, "lr_scale": base * scale,
             "lr": o.lr * base * scale,  # what set_lr sets every step (until the first)
             "name": "muon" + ("" if scale == 1.0 else f"_lr{scale:g}")}
            for scale, params in (muon or {1.0: []}).items()] + adamw


def muon_options(o: OptimConfig) -> dict:
    """`MuonAdamW`'s keywords from the config (the group defaults; the Muon group overrides
    weight decay and lr_scale; ns_dtype is the optimizer's, not a group's)."""
    return {"momentum": o.muon_momentum, "nesterov": o.muon_nesterov, "ns_steps": o.muon_ns_steps,
            "ns_dtype": o.muon_ns_dtype}


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise): what the update is applied to."""
    return t.to_local() if hasattr(t, "to_local") else t


# optim.muon_ns_dtype: what Newton-Schulz computes in
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def newton_schulz(update: torch.Tensor, ns_steps: int, dtype: str = "bfloat16") -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (quintic Newton-Schulz) of a matrix, or of each
    matrix of a stack [E, a, b] (the experts of an MoE layer, one at a time), computed in `dtype`
    (optim.muon_ns_dtype): "bfloat16" is torch's function itself, "float32" the same iteration
    in fp32 (`_newton_schulz_fp32`)."""
    if update.ndim == 3:
        if update.shape[0] == 0:  # a rank whose FSDP shard of a few experts is empty
            return update.to(NS_DTYPES[dtype])
        return torch.stack([newton_schulz(u, ns_steps, dtype) for u in update.unbind(0)])
    if dtype == "bfloat16":
        return _zeropower_via_newtonschulz(update, (DEFAULT_A, DEFAULT_B, DEFAULT_C), ns_steps,
                                           EPS)
    return _newton_schulz_fp32(update, ns_steps)


def _newton_schulz_fp32(update: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """torch's `_zeropower_via_newtonschulz` (same coefficients, transpose, normalisation and
    quintic X <- a X + (b G + c G^2) X, G = X X^T) in fp32. Written out because torch's function
    casts its input to bf16 unconditionally (it targets GPU tensor cores) and takes no dtype; on
    a CPU without bf16 matrix units bf16 GEMMs run ~50x slower than fp32 ones
    (docs/performance.md, "Muon"), and fp32 is also nearer the exact iteration."""
    x = update.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=EPS)  # spectral norm <= Frobenius norm <= 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=DEFAULT_B, alpha=DEFAULT_C), x,
                        beta=DEFAULT_A)
    return x.T if tall else x


class MuonAdamW(torch.optim.AdamW):
    """torch.optim.Muon on the groups marked "muon" (`optimizer_groups`), AdamW (its kernels,
    states and checkpoint format) on the others: one optimizer, so that the schedule, ZeRO-1,
    gradient clipping and DCP checkpoints see one object, as for AdamW alone.

    The Muon step is torch.optim.Muon's (`_single_tensor_muon`): momentum buffer
    B <- mu B + (1 - mu) g (a lerp), the Nesterov update g + mu (B - g) (a lerp again), its
    Newton-Schulz orthogonalisation O, decoupled weight decay theta <- theta (1 - lr wd), then
    theta <- theta - lr' O, bit for bit (tests/test_muon.py) with optim.muon_ns_dtype bfloat16
    (float32: the same iteration in fp32, `newton_schulz`). Written out because torch's Muon
    takes 2-D parameters only and orthogonalises what it is given: an expert stack is E
    matrices, and a sharded matrix (FSDP, tensor parallelism) must be orthogonalised whole:
    `orthogonalize` is the seam parallel/data.py's subclass gathers in.

    lr' = lr * 0.2 * sqrt(max(A, B)) for an A x B matrix: torch's adjust_lr_fn
    "match_rms_adamw" (Liu et al. 2025, sec. 2.2), which gives the orthogonalised update the RMS
    (0.2) of a typical AdamW update, so Muon's matrices can share AdamW's learning rate,
    schedule and weight decay (optim.muon_lr and optim.muon_weight_decay default to them).
    Chosen over "original" (Jordan: sqrt(max(1, A/B)), lr ~0.02) also because it is symmetric
    in A and B: a Linear weight is [out, in] while an expert stack holds [in, out], and the
    rule must not depend on which way a matrix is stored."""

    def __init__(self, params, *, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: str = "bfloat16", muon: bool = False,
                 lr_scale: float = 1.0, **adamw):
        if _zeropower_via_newtonschulz is None:
            raise ConfigError(f"optim.name=muon needs torch >= 2.9 (torch.optim.Muon), this is "
                              f"torch {torch.__version__}; use optim.name=adamw")
        super().__init__(params, **adamw)
        # the optimizer's, not a group option: group options are saved in checkpoints (and
        # restored over the config's), and how NS computes is no state of the run
        self.ns_dtype = ns_dtype
        extra = {"muon": muon, "lr_scale": lr_scale, "momentum": momentum,
                 "nesterov": nesterov, "ns_steps": ns_steps}
        self.defaults.update(extra)
        for group in self.param_groups:
            for k, v in extra.items():
                group.setdefault(k, v)
            for p in group["params"] if group["muon"] else ():
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes matrices (or stacks of them); got a "
                                     f"parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g["muon"]]
        try:  # AdamW's own step (unwrapped: the optimizer-step hooks run once, for this step)
            inspect.unwrap(torch.optim.AdamW.step)(self)
        finally:
            self.param_groups = groups
        for group in groups:
            if group["muon"]:
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr = group["lr"]  # train/step.py set_lr has multiplied in the group's lr_scale
        mu, wd = group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # "step" too: AdamW's load_state_dict expects it in every state
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            state["step"] += 1
            g, buf = local_shard(p.grad), local_shard(state["momentum_buffer"])
            buf.lerp_(g, 1 - mu)
            # (a copy without Nesterov: torch's Newton-Schulz divides its bf16 input in place,
            # which for a bf16 parameter would be the buffer itself)
            update = g.lerp(buf, mu) if group["nesterov"] else buf.clone()
            update = self.orthogonalize(update, p, group["ns_steps"])
            w = local_shard(p)
            w.mul_(1 - lr * wd)
            w.add_(update, alpha=-_adjust_lr(lr, "match_rms_adamw", p.shape[-2:]))

    def orthogonalize(self, update: torch.Tensor, p: torch.Tensor, ns_steps: int) -> torch.Tensor:
        """NS(update) of parameter `p` (whole here: one process, or whole-tensor ZeRO-1)."""
        return newton_schulz(update, ns_steps, self.ns_dtype)

    def state_keys(self, group: dict) -> tuple[str, ...]:
        """The state tensors a parameter of `group` has once stepped."""
        return ("step", "momentum_buffer") if group["muon"] else ("step", "exp_avg", "exp_avg_sq")


def params_device_type(groups: list[dict]) -> str:
    """The device type every parameter of `groups` lives on, or "mixed"."""
    types = {p.device.type for g in groups for p in g["params"]}
    return types.pop() if len(types) == 1 else "mixed"


def adamw_kernel(device_type: str, groups: list[dict]) -> dict:
    """AdamW's kernel keyword for parameter groups whose tensors all live on `device_type`
    ("mixed" if not: `params_device_type`). Fused (one kernel per device and dtype for the whole
    update) on CUDA when every parameter is floating point; DTensors qualify (torch >= 2.4 has
    DTensor rules for the fused kernels, one mesh per call: hence groups of one kind each,
    `split_by_kind`). Else foreach, which every device runs (off CUDA through torch's per-tensor
    fallback: bit for bit the per-parameter loop, a little faster on the CPU); torch's own
    default would take the loop for DTensors and on the CPU. The loop only for parameters on
    several devices, which one foreach call cannot take. `kernel_name` names the choice."""
    params = [p for g in groups for p in g["params"]]
    if device_type == "cuda" and all(torch.is_floating_point(p) for p in params):
        return {"fused": True}
    if device_type != "mixed":
        return {"foreach": True}
    return {"foreach": False}


def split_by_kind(groups: list[dict]) -> list[dict]:
    """Each group split so that its parameters are of one kind: plain tensors, or DTensors of
    one device mesh (the foreach and fused kernels take one mesh per call and cannot mix
    DTensors with tensors). A split group is named after the mesh ("decay_ep_tp"); empty groups
    are dropped."""
    from torch.distributed.tensor import DTensor
    out = []
    for g in groups:
        kinds: dict = {}
        for p in g["params"]:
            mesh = p.device_mesh if isinstance(p, DTensor) else None
            kinds.setdefault(mesh, []).append(p)
        for mesh, params in kinds.items():
            suffix = "" if mesh is None or len(kinds) == 1 else \
                "_" + "_".join(mesh.mesh_dim_names or ("dtensor",))
            out.append({**g, "name": g["name"] + suffix, "params": params})
    return out


def build_optimizer(model: nn.Module, o: OptimConfig, fused: bool | None = None,
                    cfg: Config | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups` of a model on one process (bench), or `MuonAdamW` over
    `optimizer_groups` with optim.name muon (`cfg`: the run config, for muP's lr multipliers);
    `fused` None: the kernel `adamw_kernel` picks for the parameters' device."""
    groups = optimizer_groups(model, o, cfg)
    if fused is None:
        kernel = adamw_kernel(params_device_type(groups), groups)
    else:
        kernel = {"fused": fused}
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernel)
    if o.name == "muon":
        return MuonAdamW(groups, **muon_options(o), **kw)
    return torch.optim.AdamW(groups, **kw)


def kernel_name(optimizer: torch.optim.Optimizer) -> str:
    """"fused", "foreach" or "for-loop": the AdamW kernel `optimizer` (or the optimizer a
    ZeroRedundancyOptimizer wraps) steps with, for the start-up line."""
    d = getattr(getattr(optimizer, "optim", optimizer), "defaults", {})
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """The start-up line's name of `optimizer`: "AdamW (foreach)", or with Muon how many
    matrices it steps ("Muon on 14 hidden matrices + AdamW (foreach)")."""
    local = getattr(optimizer, "optim", optimizer)
    adamw = f"AdamW ({kernel_name(optimizer)})"
    if not isinstance(local, MuonAdamW):
        return adamw
    # a partitioned optimizer (parallel/data.py) steps its own share of the groups it was given
    groups = getattr(optimizer, "all_groups", optimizer.param_groups)
    n = sum(len(g["params"]) for g in groups if g.get("muon"))
    return f"Muon on {n} hidden matrices + {adamw}"


def lr_at(step: int, o: OptimConfig, total_steps: int, d_model: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr`, then the decay.

    warmup: lr * (step + 1) / warmup_steps for step < warmup_steps.
    cosine | linear: from lr at the end of warmup down to min_lr after `decay_steps` (default:
      until total_steps), min_lr afterwards.
    constant: lr.  inverse_sqrt: lr * sqrt(warmup / step) (at least min_lr).
    wsd (warmup-stable-decay, Hu et al. 2024): lr until the last `decay_steps` (default 20% of
      the run), then linear to min_lr.
    noam (Vaswani et al. 2017, eq. 3): d_model^-0.5 * min(s^-0.5, s * warmup^-1.5), s = step + 1;
      `lr` acts as a multiplier (1.0 = the paper's schedule).
    """
    w = o.warmup_steps
    s = step + 1
    if o.schedule == "noam":
        if d_model is None:
            raise ValueError("the noam schedule needs d_model")
        return o.lr * d_model ** -0.5 * min(s ** -0.5, s * max(w, 1) ** -1.5)
    if step < w:
        return o.lr * s / w
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "inverse_sqrt":
        return max(o.min_lr, o.lr * math.sqrt(max(w, 1) / s))
    if o.schedule == "wsd":
        n_decay = o.decay_steps if o.decay_steps is not None else max(1, round(0.2 * total_steps))
        start = total_steps - n_decay
        if step < start:
            return o.lr
        frac = min(1.0, (step - start + 1) / max(n_decay, 1))
        return o.lr + (o.min_lr - o.lr) * frac
    n_decay = o.decay_steps if o.decay_steps is not None else total_steps - w
    frac = min(1.0, (step - w + 1) / max(n_decay, 1))
    if o.schedule == "linear":
        return o.lr + (o.min_lr - o.lr) * frac
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))  # cosine
