"""optim.name: muon. The parameter split (Muon on the hidden matrices only); the step against
torch.optim.Muon (adjust_lr_fn="match_rms_adamw") + torch.optim.AdamW, bit for bit, expert
stacks one expert at a time; config errors; and on an MoE model (attention matrices, expert
stacks) the single-process run against dp2 ZeRO-3 (FSDP shards gathered for Newton-Schulz),
tp2 (column/row shards gathered), ep2 with ZeRO-1 (whole experts, no gather; the partitioned
optimizer): losses within 1e-5 relative and the final weights; and the single-process step-3
checkpoint (Muon's momentum buffers included) resumed at dp2 ZeRO-1 (ZeroRedundancyOptimizer)
reproducing steps 4-5."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from helpers import (ATOL, PARALLEL_STEPS, as_overrides, assert_weights_close, cli_train, cut_back,
                     final_weights, parallel_overrides, read_losses, run_train,
                     tiny_model_config)
from llmtrain.config import ConfigError, MoEConfig, OptimConfig, load_config
from llmtrain.model.build import build_model
from llmtrain.train.optim import build_optimizer, is_muon_param, newton_schulz, optimizer_groups
from llmtrain.train.step import set_lr

STEPS = PARALLEL_STEPS
# top-2 of 4 SwiGLU experts in every layer (tests/test_expert_parallel.py's model), with Muon
MOE = {"model.moe.num_experts": 4, "model.moe.router": "topk", "model.moe.top_k": 2,
       "model.moe.capacity_factor": 1.0, "model.moe.every_n_layers": 1,
       "model.activation": "swiglu", "model.dropout": 0.0, "optim.name": "muon"}


def test_muon_takes_the_hidden_matrices_only():
    m = build_model(tiny_model_config(moe=MoEConfig(num_experts=2, every_n_layers=2),
                                      tie_embeddings=False, activation="swiglu"), "meta")
    muon = {n for n, p in m.named_parameters() if is_muon_param(n, p)}
    attention = [f"layers.{i}.attention.w{x}.weight" for i in (0, 1) for x in "qkvo"]
    mlp = [f"layers.0.feed_forward.w{i}.weight" for i in (1, 2, 3)]   # dense layer
    experts = [f"layers.1.feed_forward.experts.w{i}" for i in (1, 2, 3)]  # MoE layer
    assert muon == {*attention, *mlp, *experts}
    adamw = {n for n, _ in m.named_parameters()} - muon
    assert {"tok_embeddings.weight", "output.weight", "norm.weight",
            "layers.1.feed_forward.router.gate.weight"} <= adamw
    groups = optimizer_groups(m, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02,
                                             weight_decay=0.1, muon_weight_decay=0.0))
    assert [g["name"] for g in groups] == ["muon", "decay", "no_decay"]
    assert groups[0]["lr_scale"] == pytest.approx(20) and groups[0]["weight_decay"] == 0.0
    # DDP's "module." prefix changes nothing
    assert is_muon_param("module.layers.0.attention.wq.weight", torch.empty(2, 2))
    assert not is_muon_param("module.layers.0.feed_forward.router.gate.weight", torch.empty(2, 2))


def test_muon_step_is_torch_muon_plus_adamw():
    """Three steps of build_optimizer's MuonAdamW equal torch.optim.Muon (match_rms_adamw) on the
    matrices + torch.optim.AdamW on the rest, bit for bit; an expert stack steps as E separate
    torch Muon matrices."""
    cfg = tiny_model_config(moe=MoEConfig(num_experts=2, every_n_layers=2), activation="swiglu")
    # lr ratio a power of 2, so that lr * lr_scale is exactly muon_lr (torch Muon's lr)
    o = OptimConfig(name="muon", lr=2 ** -8, muon_lr=2 ** -5, muon_momentum=0.9)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, o)
    groups = optimizer_groups(ref, o)
    mats, stacks = [], []
    for p in groups[0]["params"]:
        if p.ndim == 2:
            mats.append(p)
        else:  # each expert a matrix of its own: a leaf per expert, copied back after
            stacks.append((p, [torch.nn.Parameter(e.clone()) for e in p.detach().unbind(0)]))
    experts = [e for _, es in stacks for e in es]
    muon = torch.optim.Muon(mats + experts, lr=2 ** -5, weight_decay=o.weight_decay, momentum=0.9,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("muon", "lr_scale")}
                               for g in groups[1:]], lr=o.lr, betas=(o.beta1, o.beta2),
                              eps=o.eps, foreach=True)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    for _ in range(3):
        for m in (model, ref):
            m(x).float().square().mean().backward()
        for p, es in stacks:
            for e, g in zip(es, p.grad.unbind(0)):
                e.grad = g.clone()
            p.grad = None  # in no optimizer: zero_grad below would not clear it
        set_lr(opt, o.lr)  # as every training step does: lr x the group's lr_scale
        opt.step()
        muon.step()
        adamw.step()
        with torch.no_grad():
            for p, es in stacks:
                p.copy_(torch.stack(es))
        for o_ in (opt, muon, adamw):
            o_.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name


def test_newton_schulz_fp32_is_the_bf16_iteration_more_exactly():
    """optim.muon_ns_dtype=float32 runs torch's iteration in fp32: it agrees with torch's bf16
    function to bf16 precision, and its polar factor (singular vectors; the quintic leaves the
    singular values in ~[0.7, 1.2] in either dtype) is that of the exact SVD, U V^T, where bf16
    rounding moves it by ~5e-3. A tall matrix (transposed inside) and an expert stack."""
    g = torch.randn(3, 96, 48, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = newton_schulz(g, 5, "float32"), newton_schulz(g, 5, "bfloat16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.equal(bf16[1], newton_schulz(g[1], 5))  # the default: torch's step
    torch.testing.assert_close(fp32, bf16.float(), rtol=0, atol=2 ** -6)

    def polar(x):
        u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u @ vh
    exact = polar(g)
    err32, err16 = ((polar(x) - exact).norm() / exact.norm() for x in (fp32, bf16))
    assert err32 < 1e-5 < 1e-3 < err16


@pytest.mark.parametrize("sets, message", [
    ({"optim.muon_momentum": 1.0}, "optim.muon_momentum=1.0 must be below 1"),
    ({"optim.name": "sgd"}, "optim.name"),
    ({"optim.muon_ns_dtype": "float16"}, "optim.muon_ns_dtype='float16' is not valid"),
    ({"parallel.engine": "deepspeed"}, "optim.name=muon with parallel.engine=deepspeed"),
])
def test_muon_config_errors(sets, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, as_overrides({"optim.name": "muon", **sets}))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process MoE run with Muon, with a checkpoint at step 3."""
    run = tmp_path_factory.mktemp("muon") / "single"
    assert cli_train(parallel_overrides(run, **MOE, **{"checkpoint.every": 3})) == 0
    return run


# Final-weight tolerance where the gradients are summed in another order (tensor parallelism's
# partial sums, expert parallelism's all-to-all: float noise ~1e-7 relative): Newton-Schulz
# amplifies the noise in a matrix's smallest singular directions by up to a^5 ~ 485
# (a = 3.4445, the quintic's slope at 0, five iterations) in bf16, and AdamW's m / sqrt(v)
# amplifies it again in embedding rows whose gradient is ~0. Measured after 5 steps: tp2 1.3e-4,
# ep2 1.1e-4 (the losses agree within 1e-6). Without the gather (each rank orthogonalising its
# own shard) the losses leave 1e-5 from step 2 or 3 (2e-4 relative at dp2 ZeRO-3, 5e-4 at tp2).
NOISY_ATOL = 1e-3
LAYOUTS = {
    # name: (processes, parallel overrides, final-weight tolerance)
    "dp2-zero3": (2, {"parallel.zero_stage": 3}, ATOL),  # bit for bit here
    "tp2": (2, {"parallel.tp": 2}, NOISY_ATOL),
    "ep2-zero1": (2, {"parallel.ep": 2, "parallel.zero_stage": 1}, NOISY_ATOL),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_muon_layout_matches_single_process(name, tmp_path, reference):
    nproc, par, atol = LAYOUTS[name]
    run = tmp_path / name
    r = run_train(parallel_overrides(run, **MOE, **par), nproc=nproc)
    assert "optimizer: Muon on 14 hidden matrices" in r.stdout
    assert read_losses(run) == pytest.approx(read_losses(reference), rel=1e-5)
    assert_weights_close(final_weights(run, STEPS), final_weights(reference, STEPS), atol=atol)


def test_muon_checkpoint_resumes_at_another_layout(tmp_path, reference):
    """The single-process step-3 checkpoint resumed at dp2 ZeRO-1: steps 4-5 (so the momentum
    buffers) match the uninterrupted run."""
    run = tmp_path / "resumed"
    shutil.copytree(reference, run)
    cut_back(run, 3, STEPS)
    r = run_train(parallel_overrides(run, **MOE, **{"checkpoint.every": 3,
                                                    "parallel.zero_stage": 1}), nproc=2)
    assert "resumed from" in r.stdout and "step_3" in r.stdout
    assert read_losses(run) == pytest.approx(read_losses(reference), rel=1e-5)
    assert_weights_close(final_weights(run, STEPS), final_weights(reference, STEPS))
