"""The torch engine's step object (train/step.py) on one process against a plain reference: the
mean token cross entropy of the whole step (two micro-batches, masked tokens left out) and the
gradients of one backward over it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.config import load_config
from llmtrain.data.loader import Batch
from llmtrain.model import build_model
from llmtrain.train.step import TrainStep


def test_train_step_is_the_mean_token_loss_of_the_whole_step():
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4",
                             "model.vocab_size=97", "train.grad_clip=0", "optim.weight_decay=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ref = build_model(cfg.model)
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (4, 17), generator=g)
    mask = (torch.rand(4, 16, generator=g) > 0.3).float()
    batches = [Batch(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:], mask[i:i + 2], None, ids)
               for i, ids in ((0, [3, 4]), (2, [7, 8]))]
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
