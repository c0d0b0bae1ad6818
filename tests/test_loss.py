"""The memory-lean losses (`train.loss: chunked`, and `fused`, its gradients computed in the
forward; train/lean_loss.py) against the plain one (train/loss.py's cross entropy of the whole
logits): the value and the gradients of the hidden states and the output weight within fp32
rounding for chunk sizes that do and do not divide the tokens, with masked tokens; within bf16
rounding under autocast; what they keep for the backward (no [N, V] tensor); the training step
wired to them; and training runs (one process, FSDP, and tensor parallel, on 2 gloo processes)
against the single-process run with the plain loss."""

from __future__ import annotations

import pytest
import torch

from helpers import (PARALLEL_STEPS, assert_weights_close, cli_train, final_weights,
                     parallel_overrides, read_losses, run_train)
from llmtrain.config import ConfigError, load_config
from llmtrain.data.loader import Batch
from llmtrain.model import build_model
from llmtrain.train.lean_loss import FusedLinearCrossEntropy, linear_cross_entropy_sum
from llmtrain.train.loss import cross_entropy_sum
from llmtrain.train.step import TrainStep

N, D, V = 74, 32, 257  # tokens, width, vocabulary; chunks of 16 and 48 tokens do not divide N
LEAN = {"train.loss": "chunked", "train.loss_chunk_tokens": 48}  # 48 does not divide 4 x 32


def problem(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(h [N, D], W [V, D], labels [N], mask [N] with about a third of the tokens masked)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    mask = (torch.rand(N, generator=g) > 0.3).float()
    return h, w, labels, mask


def loss_and_grads(loss_fn, h, w, labels, mask):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(h, w, labels, mask)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def plain(h, w, labels, mask):
    return cross_entropy_sum((h @ w.t())[None], labels[None], mask[None])


def lean(chunk, fused=False):
    return lambda h, w, labels, mask: linear_cross_entropy_sum(h, w, labels, mask, chunk,
                                                               fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
@pytest.mark.parametrize("chunk", [1, 16, 48, N, 1000])
def test_value_and_gradients_equal_the_plain_loss_in_fp32(chunk, fused):
    """Each chunking (one token, chunks dividing N or not, one chunk, more than N) gives the
    plain loss and its gradients to fp32 rounding; masked tokens contribute nothing."""
    args = problem()
    expected = loss_and_grads(plain, *args)
    got = loss_and_grads(lean(chunk, fused), *args)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert got[1][args[3] == 0].abs().max() == 0  # masked tokens: no gradient


def test_fused_gradients_scale_with_the_incoming_gradient_and_skip_without_autograd(monkeypatch):
    """The fused loss's backward scales the gradients its forward computed by the incoming one,
    in place, so a second backward through a kept graph is refused in one line; without
    autograd the chunked forward runs (the fused one would compute gradients for nothing)."""
    h, w, labels, mask = problem()
    expected = loss_and_grads(plain, h, w, labels, mask)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, w, labels, mask, 16, fused=True)
    assert "FusedLinearCrossEntropy" in loss.grad_fn.name()
    got = torch.autograd.grad(loss * 2.5, (h, w), retain_graph=True)
    for g, e in zip(got, expected[1:]):
        torch.testing.assert_close(g, e * 2.5, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="train.loss=fused runs one backward per forward"):
        torch.autograd.grad(loss, (h, w))

    def no_fused_forward(*args):
        raise AssertionError("the fused forward ran without autograd")
    monkeypatch.setattr(FusedLinearCrossEntropy, "forward", no_fused_forward)
    with torch.no_grad():
        value = linear_cross_entropy_sum(h, w, labels, mask, 16, fused=True)
    torch.testing.assert_close(value, expected[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
def test_bf16_autocast_computes_bf16_logits_within_bf16_rounding(fused):
    """Under bf16 autocast the chunk logits are bf16 with the log-sum-exp in fp32, as the plain
    loss computes them: the same loss value (which bf16 moved off the fp32 one), gradients
    within bf16 rounding of the fp32 ones and in the dtypes of h and W."""
    args = problem()
    exact = loss_and_grads(plain, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lean(16, fused), *args)
        ref = loss_and_grads(plain, *args)
    assert abs(ref[0] - exact[0]) > 1e-5 * exact[0]  # bf16 logits change the loss ...
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)  # ... equally in both
    assert got[1].dtype == got[2].dtype == torch.float32
    for g, e in zip(got[1:], exact[1:]):
        assert (g - e).abs().max() <= 2e-2 * e.abs().max()


def saved_bytes(loss_fn, h, w, labels, mask) -> tuple[int, int]:
    """(bytes of every tensor the autograd graph of loss_fn saves for the backward, the largest
    of them), beyond the inputs h and W themselves (saved too, but not allocated by the loss)."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    sizes = []

    def pack(t):
        if t.data_ptr() not in (h.data_ptr(), w.data_ptr()):
            sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(h, w, labels, mask)
    return sum(sizes), max(sizes)


def test_the_backward_keeps_no_logits():
    """The plain loss keeps [N, V] logits for its backward; the chunked one keeps labels, mask
    and the log-sum-exp of each token (O(N)), whatever the chunk size; the fused one the
    gradients of h [N, D] and of W [V, D], in fp32."""
    args = problem()
    plain_total, plain_largest = saved_bytes(plain, *args)
    assert plain_largest >= N * V * 4
    for chunk in (16, N):
        total, largest = saved_bytes(lean(chunk), *args)
        assert total <= 3 * 8 * N, (chunk, total)
        total, largest = saved_bytes(lean(chunk, fused=True), *args)
        assert total == (N + V) * D * 4, (chunk, total)


@pytest.mark.parametrize("lean_loss", ["chunked", "fused"])
def test_training_step_uses_the_lean_loss(lean_loss):
    """TrainStep with train.loss=chunked or fused: the plain step's loss and gradients, and no
    [B, T, V] tensor kept by the forward (so the model's head, not the output layer, computed
    it)."""
    # d_model 16: the [97, 16] output weight is smaller than the [2 x 16, 97] logits
    sets = ["model.n_layers=1", "model.d_model=16", "model.n_heads=4", "model.vocab_size=97",
            "train.grad_clip=0", "train.loss_chunk_tokens=5"]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 17), generator=g)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], (torch.rand(2, 16, generator=g) > 0.3).float(),
                  None, [0, 1])
    out = {}
    for loss in ("plain", lean_loss):
        cfg = load_config(None, [*sets, f"train.loss={loss}"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), cfg,
                         torch.device("cpu"))
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ce, _ = step.forward_loss(batch)
        if loss != "plain":  # the autograd function train.loss names computed it
            function = {"chunked": "LinearCrossEntropy", "fused": "FusedLinearCrossEntropy"}[loss]
            assert ce.grad_fn.name() == function + "Backward"
        ce.backward()
        out[loss] = ce.detach(), {n: p.grad for n, p in model.named_parameters()}, max(sizes)
    torch.testing.assert_close(out[lean_loss][0], out["plain"][0], rtol=1e-6, atol=0)
    for n, grad in out["plain"][1].items():
        torch.testing.assert_close(out[lean_loss][1][n], grad, rtol=1e-5, atol=1e-7)
    assert out["plain"][2] >= 2 * 16 * 97 > out[lean_loss][2]


@pytest.mark.parametrize("sets, message", [
    ({"model.output": "mos"}, "train.loss=chunked with model.output=mos is not supported"),
    ({"parallel.engine": "deepspeed"}, "train.loss=chunked with parallel.engine=deepspeed"),
    ({"parallel.engine": "deepspeed", "train.loss": "fused"},
     "train.loss=fused with parallel.engine=deepspeed"),
])
def test_unsupported_combinations_are_refused(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, parallel_overrides(tmp_path, **{**LEAN, **sets}))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The single-process run with the plain loss: its losses and final weights."""
    run = tmp_path_factory.mktemp("plain") / "run"
    assert cli_train(parallel_overrides(run)) == 0
    return read_losses(run), final_weights(run, PARALLEL_STEPS)


@pytest.mark.parametrize("nproc, par", [
    (1, {}),
    (2, {"parallel.zero_stage": 3}),
    (2, {"parallel.tp": 2}),
    (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    (1, {"train.loss": "fused"}),
    (2, {"parallel.zero_stage": 3, "train.loss": "fused"}),
    (2, {"parallel.zero_stage": 0, "train.loss": "fused"}),
    (2, {"parallel.tp": 2, "parallel.sequence_parallel": True, "train.loss": "fused"}),
], ids=["single", "dp2-fsdp", "tp2", "tp2-sp", "fused-single", "fused-dp2-fsdp", "fused-dp2-ddp",
                   "fused-tp2-sp"])
def test_training_with_the_lean_loss_matches_the_plain_run(tmp_path, plain_run, nproc, par):
    """5 steps with the chunked or fused loss (FSDP: the output weight gathered inside the
    root's forward, its gradient returned by the backward; tp: the vocabulary-parallel version;
    gloo) against the single-process plain run: losses within 1e-5 relative, final weights
    within ATOL."""
    run = tmp_path / "lean"
    run_train(parallel_overrides(run, **{**LEAN, **par}), nproc=nproc)
    losses, weights = plain_run
    assert read_losses(run) == pytest.approx(losses, rel=1e-5)
    assert_weights_close(final_weights(run, PARALLEL_STEPS), weights)
