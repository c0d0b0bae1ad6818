"""Activation memory per transformer block with parallel.activation_checkpointing none, selective
and full, measured, next to the planner's Korthikanti et al. 2022 figures for the same shape.

Measured: a stack of blocks (built by llmtrain, checkpointed by `apply_ac`) runs forward and
backward on a [b, s, h] input under the profiler's memory events, which record every allocation
and free of the allocator (CPU or CUDA). "kept" is the bytes still allocated when the forward
ends (what the blocks hold for their backward: each block's input included, as Korthikanti
count it, and under checkpointing the 5 KiB CPU RNG state kept to replay dropout); "peak" the
most allocated at any moment of forward and backward (a recomputed block's transient activations
included). Both are per block (the stack's total / its blocks), relative to the moment before
the forward; parameter gradients are allocated beforehand so that neither
counts them. Saved-tensor hooks cannot measure this: a checkpointed forward's saved tensors go to
torch.utils.checkpoint's own hooks, and selective checkpointing keeps its tensors in a cache
no hook sees.

Planner: `planner.memory.layer_activation_bytes` with this shape's norm, MLP, dropout and element
size, as `llmtrain plan` calls it, with flash (no s x s attention scores kept) where SDPA runs a
fused kernel: always on CUDA, on the CPU only without dropout (with dropout it runs the math
kernel, which keeps the scores).

    python benchmarks/activation_memory.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc

import torch

from llmtrain.config import GLU_ACTIVATIONS, Config, ModelConfig
from llmtrain.model.build import build_model
from llmtrain.parallel.checkpointing import apply_ac
from llmtrain.planner.memory import layer_activation_bytes

MODES = ("none", "selective", "full")
# (name, model keys): a Llama-style block and the GPT block of Korthikanti's Table 2
ARCHS = {"llama": {"norm": "rmsnorm", "activation": "swiglu", "position": "rope", "dropout": 0.0},
         "gpt": {"norm": "layernorm", "activation": "gelu", "position": "learned",
                 "dropout": 0.1, "bias": True}}
SHAPES = [(256, 2, 256, 4), (512, 1, 256, 8), (256, 4, 512, 8)]  # (s, b, h, a)
N_BLOCKS = 2


def forward_memory(forward, backward, device: torch.device) -> tuple[int, int]:
    """(bytes of `device` allocated and not freed by `forward()`, most bytes allocated at once
    during `forward()` then `backward(out)`), from the profiler's allocator events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    gc.collect()
    with profile(activities=activities, profile_memory=True) as prof:
        out = forward()
        gc.collect()  # what reference cycles hold is not kept: count it the same in every run
        with record_function("forward_end"):  # a mark in the event stream
            pass
        backward(out)
        del out
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    on_device = getattr(DeviceType, device.type.upper())
    total = peak = kept = 0
    for e in events:
        if e.name() == "forward_end":
            kept = total
        elif e.name() == "[memory]" and e.device_type() == on_device:
            total += e.nbytes()
            peak = max(peak, total)
    return kept, peak


def block_stack(model_cfg: ModelConfig, mode: str) -> torch.nn.Module:
    """The model of `model_cfg` with its blocks checkpointed by `mode` (gradients allocated)."""
    cfg = Config(model=model_cfg)
    cfg.parallel.activation_checkpointing = mode
    torch.manual_seed(0)
    model = build_model(model_cfg)
    apply_ac(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def measure(model_cfg: ModelConfig, mode: str, b: int, s: int,
            device: torch.device) -> tuple[float, float]:
    """Per block (kept bytes, peak bytes) of `model_cfg`'s blocks under `mode`."""
    model = block_stack(model_cfg, mode).to(device)
    blocks = list(model.layers.values())
    rope = None if model.rope_cos is None else (model.rope_cos[:s], model.rope_sin[:s])
    x = torch.randn(b, s, model_cfg.d_model, device=device, requires_grad=True)

    def forward():
        h = x
        for block in blocks:
            h = block(h, rope, None)
        return h

    kept, peak = forward_memory(forward, lambda out: out.sum().backward(), device)
    return kept / len(blocks), peak / len(blocks)


def planner_bytes(m: ModelConfig, s: int, b: int, mode: str, device: torch.device) -> float:
    """`llmtrain plan`'s bytes per block for this shape (fp32 elements)."""
    flash = device.type == "cuda" or m.dropout == 0
    return layer_activation_bytes(s, b, m.d_model, m.n_heads, recompute=mode, ffn=m.ffn_dim,
                                  glu=m.activation in GLU_ACTIVATIONS, kv_heads=m.kv_heads,
                                  dropout=m.dropout > 0, layernorm=m.norm == "layernorm",
                                  flash=flash, elem_bytes=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    device = torch.device(ap.parse_args().device)
    print(f"{'arch':5} {'s':>4} {'b':>2} {'h':>4} {'a':>2} {'mode':9} | {'kept KiB':>9} "
          f"{'peak KiB':>9} | {'plan KiB':>9} {'kept/plan':>9} | {'kept/none':>9} "
          f"{'plan/none':>9}")
    for arch, keys in ARCHS.items():
        for s, b, h, a in SHAPES:
            m = ModelConfig(n_layers=N_BLOCKS, d_model=h, n_heads=a, vocab_size=64,
                            max_seq_len=s, **keys)
            rows = {mode: (*measure(m, mode, b, s, device), planner_bytes(m, s, b, mode, device))
                    for mode in MODES}
            for mode, (kept, peak, plan) in rows.items():
                print(f"{arch:5} {s:4} {b:2} {h:4} {a:2} {mode:9} | {kept / 1024:9.0f} "
                      f"{peak / 1024:9.0f} | {plan / 1024:9.0f} {kept / plan:9.2f} | "
                      f"{kept / rows['none'][0]:9.2f} {plan / rows['none'][2]:9.2f}")
    print(f"(per block, fp32, {N_BLOCKS} blocks, {device.type}; plan = planner.memory."
          f"layer_activation_bytes)")


if __name__ == "__main__":
    main()
