"""muP (model.parametrization: mup, model/mup.py; Yang et al. 2022, Tensor Programs V): the
coordinate check (AdamW, and Muon with its 1/sqrt(m)), the rules against their table, the lr
multipliers the optimizer groups carry, the refusals, and the ablate report's best lr per
width."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import one_thread, tiny_model_config, tokens
from llmtrain.ablate import Size, lr_sweep_lines, lr_sweep
from llmtrain.config import Config, ConfigError, OptimConfig
from llmtrain.config.validate import validate
from llmtrain.model import build_model
from llmtrain.model.mup import lr_multiplier
from llmtrain.train.optim import build_optimizer, optimizer_groups, param_groups
from llmtrain.train.step import set_lr


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (helpers.one_thread)."""
    with one_thread():
        yield


def run_config(d_model: int, param: str = "mup", base: int = 32, **model) -> Config:
    cfg = Config()
    for k, v in {"n_layers": 2, "n_heads": 4, "vocab_size": 256, "max_seq_len": 32,
                 "d_model": d_model, **model}.items():
        setattr(cfg.model, k, v)
    if param == "mup":
        cfg.model.parametrization, cfg.model.base_d_model = "mup", base
    return cfg


def coordinates(param: str, width: int, steps: int = 3, lr: float = 1e-2, optim: str = "adamw",
                branches: bool = False) -> list[float]:
    """Mean |x| of each block's output (`branches`: of its residual branches, output minus
    input) and of the logits after `steps` steps of optimizer `optim` (adamw, or muon with
    Newton-Schulz in fp32) on fixed random tokens (the muP paper's coordinate check, Figure 5),
    base width 32."""
    cfg = run_config(width, param)
    cfg.optim = OptimConfig(name=optim, lr=lr, weight_decay=0.0, muon_ns_dtype="float32")
    model = build_model(cfg.model, seed=0)
    opt = build_optimizer(model, cfg.optim, cfg=cfg)
    data = torch.randint(0, 256, (steps, 4, 17), generator=torch.Generator().manual_seed(0))
    for t in range(steps):
        set_lr(opt, lr)  # as the training loop does: lr x each group's muP multiplier
        logits = model(data[t, :, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[t, :, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out: list[float] = []
    hooks = [b.register_forward_hook(
        lambda m, i, o: out.append((o - i[0] if branches else o).abs().mean().item()))
        for b in model.layers.values()]
    with torch.no_grad():
        out.append(model(data[0, :, :-1]).abs().mean().item())
    for h in hooks:
        h.remove()
    return out


def test_coordinate_check_flat_under_mup_growing_under_standard():
    """Widths 32, 64, 128 (base 32), 3 steps at lr 1e-2: under muP every block output's and the
    logits' mean |x| at widths 64 and 128 stays within 1.6x of width 32's; under the standard
    parametrization the block outputs grow with width, over 2.5x from 32 to 128."""
    ratios = {}
    for param in ("standard", "mup"):
        c = {w: coordinates(param, w) for w in (32, 64, 128)}
        ratios[param] = {w: [b / a for a, b in zip(c[32], c[w])] for w in (64, 128)}
    mup, sp = ratios["mup"], ratios["standard"]
    assert all(1 / 1.6 < r < 1.6 for w in (64, 128) for r in mup[w]), mup
    for r64, r128 in zip(sp[64][:-1], sp[128][:-1]):  # the block outputs
        assert 1 < r64 < r128 and r128 > 2.5, sp


def test_coordinate_check_with_muon():
    """The same check with Muon on the hidden matrices (model/mup.py: Muon's lr x 1/sqrt(m)),
    on the blocks' residual branches (what the hidden matrices compute; the block outputs are
    dominated by the embeddings, AdamW's under both): under muP every branch stays within 1.25x
    of width 32's (measured 1.02-1.05; without the 1/sqrt(m), 1.5x at width 128), the logits
    within 1.6x; under the standard parametrization they grow, over 2.5x at width 128
    (measured 5-6x). At m = 1 muP is the standard Muon run exactly."""
    c = {(param, w): coordinates(param, w, optim="muon", branches=True)
         for param in ("standard", "mup") for w in (32, 64, 128)}
    assert c["mup", 32] == c["standard", 32]
    mup, sp = ({w: [b / a for a, b in zip(c[param, 32], c[param, w])] for w in (64, 128)}
               for param in ("mup", "standard"))
    assert all(1 / 1.25 < r < 1.25 for w in (64, 128) for r in mup[w][:-1]), mup
    assert all(1 / 1.6 < mup[w][-1] < 1.6 for w in (64, 128)), mup
    for r64, r128 in zip(sp[64], sp[128]):
        assert 1 < r64 < r128 and r128 > 2.5, sp


def test_rules_and_lr_multipliers():
    """Tensor Programs V Table 8 (Adam): hidden matrices lr / m and std / sqrt(m); input,
    output and vectors lr; readout input x 1/m; attention ~1/head_dim. The same multiplier under
    parallelize()'s wrapper names; 1/sqrt(m) where Muon owns a hidden matrix, in its group."""
    torch.manual_seed(0)
    cfg = run_config(128, tie_embeddings=False, position="learned")  # m = 4
    model = build_model(cfg.model, seed=0)
    hidden = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    for name, p in model.named_parameters():
        mult, why = lr_multiplier(name, p.shape, cfg)
        is_hidden = name.split(".")[-2] in hidden
        assert mult == (0.25 if is_hidden else 1.0), (name, why)
        assert lr_multiplier(name, p.shape, cfg, muon=True)[0] == (0.5 if is_hidden else 1.0)
        for wrapped in (f"module.{name}", f"_orig_mod.{name}",
                        name.replace("layers.0.", "layers.0._checkpoint_wrapped_module.")):
            assert lr_multiplier(wrapped, p.shape, cfg)[0] == mult, wrapped
        if is_hidden:  # N(0, 0.02 / sqrt(4)), and GPT-2's 1/sqrt(2N) on wo, w2
            depth = math.sqrt(2 * 2) if name.split(".")[-2] in ("wo", "w2") else 1.0
            assert p.std().item() == pytest.approx(0.01 / depth, rel=0.08), name
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.output.weight.std().item() == pytest.approx(0.02, rel=0.05)
    x = tokens(2, 8, 256)
    with torch.no_grad():  # the readout multiplier reaches the chunked loss's head too
        assert torch.equal(model(x, head=lambda h, out, softcap: out(h)), model(x))
        h = model(x, head=lambda h, out, softcap: h)
        model.readout_scale = 1.0
        assert torch.equal(h, model(x, head=lambda h, out, softcap: h) * 0.25)
        model.readout_scale = 0.25
    core = model.layers["0"].attention.core  # sqrt(base_head_dim) / head_dim = sqrt(8) / 32
    assert core.scale == pytest.approx(math.sqrt(8) / 32)
    q, k, v = torch.randn(3, 1, 2, 5, 32).unbind(0)
    ref = torch.softmax((q @ k.transpose(-1, -2) * core.scale).masked_fill(
        ~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf), -1) @ v
    assert torch.allclose(core(q, k, v), ref, atol=1e-6)
    # the groups carry the multiplier; set_lr applies it
    groups = param_groups(model, 0.1, cfg)
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 3e-3)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lrs[id(p)] for n, p in model.named_parameters()
            if n.split(".")[-2] in hidden} == {3e-3 / 4}
    assert lrs[id(model.output.weight)] == lrs[id(model.norm.weight)] == 3e-3
    o = OptimConfig(name="muon", lr=3e-3, muon_lr=6e-3)
    cfg.optim, cfg.train.seq_len = o, 32
    validate(cfg)  # muP with Muon is allowed
    muon = optimizer_groups(model, o, cfg)[0]
    assert muon["name"] == "muon_lr0.5" and muon["lr_scale"] == 2 * 0.5
    assert {id(p) for p in muon["params"]} == {id(p) for n, p in model.named_parameters()
                                               if n.split(".")[-2] in hidden}
    # standard: the two groups as before, no multiplier
    std_cfg = run_config(128, "standard")
    groups = param_groups(build_model(std_cfg.model, device="meta"), 0.1, std_cfg)
    assert [sorted(g) for g in groups] == [["name", "params", "weight_decay"]] * 2


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_base_width_is_standard(arch):
    """At d_model = base_d_model muP is the standard model exactly (same init, outputs); at 2x
    the readout multiplier is 1/2 and attention (self and cross) uses the muP scale. The
    encoder-decoder also runs in training mode (cross-attention's dropout)."""
    kw = dict(arch=arch, n_encoder_layers=1, n_decoder_layers=1) if arch != "decoder" else {}
    src, tgt = tokens(2, 6, 61, seed=1), tokens(2, 5, 61, seed=2)

    def forward(model):
        return model(src, tgt) if arch != "decoder" else model(tgt)
    std = build_model(tiny_model_config(**kw), seed=0)
    mup = build_model(tiny_model_config(parametrization="mup", base_d_model=32, **kw), seed=0)
    assert torch.equal(forward(std), forward(mup))
    wide = build_model(tiny_model_config(d_model=64, parametrization="mup", base_d_model=32,
                                         **kw), seed=0)
    assert wide.readout_scale == 0.5
    scales = {m.scale for m in wide.modules() if type(m).__name__ == "ScaledDotProduct"}
    assert len(scales) == 1 and scales.pop() == pytest.approx(math.sqrt(8) / 16)
    forward(wide.train()).sum().backward()


@pytest.mark.parametrize("sets, message", [
    ({"parametrization": "mup"}, r"model.parametrization=mup needs model.base_d_model"),
    ({"base_d_model": 64}, r"model.base_d_model=64 is used by model.parametrization=mup only"),
    ({"parametrization": "mup", "base_d_model": 64, "mixer": "gmlp"},
     r"model.mixer=gmlp with model.parametrization=mup is not supported"),
    ({"parametrization": "mup", "base_d_model": 64, "engine": "deepspeed"},
     r"parallel.engine=deepspeed with model.parametrization=mup"),
])
def test_config_errors(sets, message):
    cfg = Config()
    for k, v in sets.items():
        section = cfg.parallel if k == "engine" else cfg.model
        setattr(section, k, v)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_hf_export_refuses_mup():
    from llmtrain.train.export import hf_architecture
    with pytest.raises(ConfigError, match="parametrization=mup cannot be exported"):
        hf_architecture(tiny_model_config(parametrization="mup", base_d_model=32))


def test_lr_sweep_marks_best_lr_per_width():
    """Variants that differ only in optim.lr form a family per other overrides; each size's best
    lr is its lowest loss, and `moved` counts the grid steps between the sizes' best lrs."""
    class Spec:
        sizes = [Size("s", ["model.d_model=32"]), Size("l", ["model.d_model=128"])]
    losses = {("s", 1e-3): 5.0, ("s", 2e-3): 4.0, ("s", 4e-3): 4.5,
              ("l", 1e-3): 4.2, ("l", 2e-3): 4.4, ("l", 4e-3): None}
    rows = [{"overrides": [f"model.d_model={32 if size == 's' else 128}",
                           "model.parametrization=mup", f"optim.lr={lr}"], "size": size,
             "final_val_loss_mean": loss} for (size, lr), loss in losses.items()]
    rows.append({"overrides": ["model.d_model=32"], "size": "s", "final_val_loss_mean": 3.0})
    (fam,) = lr_sweep(Spec, rows)
    assert fam["family"] == "model.parametrization=mup" and fam["lrs"] == [1e-3, 2e-3, 4e-3]
    assert fam["sizes"]["s"]["best_lr"] == 2e-3 and fam["sizes"]["l"]["best_lr"] == 1e-3
    assert fam["moved"] == 1
    md = "\n".join(lr_sweep_lines([fam]))
    assert "| s | 5.0000 | **4.0000** | 4.5000 | 0.002 |" in md
    assert "| l | **4.2000** | 4.4000 | - | 0.001 |" in md
