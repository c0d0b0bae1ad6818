"""The torch engine's step object (train/step.py) on one process against a plain reference: the
mean token cross entropy of the whole step (two micro-batches, masked tokens left out) and the
gradients of one backward over it; and the host syncs one step makes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import llmtrain
from llmtrain.config import load_config
from llmtrain.data.loader import Batch
from llmtrain.model import build_model
from llmtrain.parallel.data import build_optimizer
from llmtrain.train.step import HOST_SYNCS_PER_STEP, TrainStep

SETS = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=97",
        "train.grad_clip=0", "optim.weight_decay=0"]


def two_micro_batches() -> tuple[torch.Tensor, torch.Tensor, list[Batch]]:
    """(tokens [4, 17], loss mask [4, 16], the two micro-batches of 2 sequences they make)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (4, 17), generator=g)
    mask = (torch.rand(4, 16, generator=g) > 0.3).float()
    batches = [Batch(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:], mask[i:i + 2], None, ids)
               for i, ids in ((0, [3, 4]), (2, [7, 8]))]
    return tokens, mask, batches


def test_train_step_is_the_mean_token_loss_of_the_whole_step():
    cfg = load_config(None, SETS)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ref = build_model(cfg.model)
    ref.load_state_dict(model.state_dict())
    tokens, mask, batches = two_micro_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay comparable
    step = TrainStep(model, opt, cfg, torch.device("cpu"))
    grads = {}
    for n, p in model.named_parameters():  # the step frees the gradients after the update:
        # keep the accumulated gradient as it stands after the last micro-batch's backward
        p.register_post_accumulate_grad_hook(
            lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
    out = step(batches, lr=0.0)

    logits = ref(tokens[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    loss = (ce * mask.flatten()).sum() / mask.sum()
    loss.backward()
    assert abs(out.loss - loss.item()) <= 1e-6 * loss.item()
    assert out.sample_ids == [3, 4, 7, 8] and not out.skipped and out.lr == 0.0
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))
    assert abs(out.grad_norm - norm.item()) <= 1e-5 * norm.item()


# What reads a tensor's value on the host: on a GPU each is a device-to-host copy that waits for
# every kernel queued before it.
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__format__}
_DISPATCH = (str(Path(torch.__file__).parent / "overrides.py"),
             str(Path(torch.__file__).parent / "_tensor.py"))
_OURS = str(Path(llmtrain.__file__).parent)


class HostReads(TorchFunctionMode):
    """Records every tensor read (`_READS`) whose caller is llmtrain's code, as file:line. The
    CPU has no sync to detect (torch.cuda.set_sync_debug_mode is the GPU's), so this counts the
    reads the code makes; torch's own (AdamW's step counters, host tensors) are not ours."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            frame = sys._getframe(1)
            while frame.f_code.co_filename in _DISPATCH:  # Tensor.__float__ & co. in Python
                frame = frame.f_back
            if frame.f_code.co_filename.startswith(_OURS):
                where = frame.f_code.co_filename.removeprefix(_OURS)
                self.reads.append(f"llmtrain{where}:{frame.f_lineno} {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_a_step_reads_the_device_once():
    """A (non-logging) step with clipping, AdamW and two micro-batches reads device values on
    the host HOST_SYNCS_PER_STEP (1) times: the loss and norm for the skip decision. The
    reported values are the step's (the loss of the first step's reference test above)."""
    cfg = load_config(None, [*SETS[:-2], "train.grad_clip=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    step = TrainStep(model, build_optimizer(model, cfg, None), cfg, torch.device("cpu"))
    _, _, batches = two_micro_batches()
    step(batches, lr=1e-3)  # the first step creates the AdamW states
    with HostReads() as mode:
        out = step(batches, lr=1e-3)
    assert len(mode.reads) <= HOST_SYNCS_PER_STEP == 1, mode.reads
    assert isinstance(out.loss, float) and isinstance(out.grad_norm, float)
    assert not out.skipped and out.grad_norm > 0.5  # clipped: the coefficient ran on the device
