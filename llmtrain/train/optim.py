"""AdamW with parameter groups, and learning-rate schedules as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmtrain.config import Config, OptimConfig
from llmtrain.model.mup import lr_multiplier


def param_groups(model: nn.Module, weight_decay: float, cfg: Config | None = None) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases and embeddings (GPT-3, Llama).
    With run config `cfg`, each group is split further by model/mup.py's `lr_multiplier` of
    (name, shape, cfg): a group whose multiplier is not 1 (muP's hidden matrices: 1/m) holds it
    as `lr_scale` (and starts at that lr), which train/step.py `set_lr` multiplies into every
    step's lr. Under the standard parametrization the groups are the two above, as before."""
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    seen = set()
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
    """AdamW over `param_groups` of a model on one process (bench; `cfg`: the run config, for
    muP's lr multipliers); `fused` None: the kernel `adamw_kernel` picks for the parameters'
    device."""
    groups = param_groups(model, o.weight_decay, cfg)
    if fused is None:
        kernel = adamw_kernel(params_device_type(groups), groups)
    else:
        kernel = {"fused": fused}
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernel)


def kernel_name(optimizer: torch.optim.Optimizer) -> str:
    """"fused", "foreach" or "for-loop": the AdamW kernel `optimizer` (or the optimizer a
    ZeroRedundancyOptimizer wraps) steps with, for the start-up line."""
    d = getattr(getattr(optimizer, "optim", optimizer), "defaults", {})
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


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
