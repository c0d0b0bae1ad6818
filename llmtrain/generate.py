"""Greedy generation for both model families, and `llmtrain generate CHECKPOINT --prompt TEXT`
(CHECKPOINT: a checkpoint dir or a run dir, resolved as `llmtrain export` does).

No KV cache: every step reruns the (cropped) sequence. Simple and obviously correct, which is what
checking a trained run by eye needs; it is not a serving path.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Sequence

import torch
from torch import nn

from llmtrain.config import ConfigError


def _as_batch(ids: Sequence[int] | torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ConfigError(f"{what} is empty; give at least one token")
    return ids


@torch.no_grad()
def _greedy(step, ids: torch.Tensor, max_new_tokens: int, max_len: int,
            eos: int | None) -> list[int]:
    """Append argmax(step(ids[-max_len:])[last]) up to max_new_tokens times or until eos."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(step(ids[:, -max_len:])[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def greedy_decoder(model: nn.Module, prompt_ids: Sequence[int] | torch.Tensor,
                   max_new_tokens: int, eos: int | None = None) -> list[int]:
    """New token ids (no prompt, no eos) a decoder-only model continues `prompt_ids` with."""
    device = next(model.parameters()).device
    ids = _as_batch(prompt_ids, device, "the prompt")
    with _eval_mode(model):
        return _greedy(model, ids, max_new_tokens, model.cfg.max_seq_len, eos)


def greedy_encoder_decoder(model: nn.Module, src_ids: Sequence[int] | torch.Tensor,
                           max_new_tokens: int, bos: int, eos: int | None = None) -> list[int]:
    """Target ids (without the start token `bos` or eos) an encoder-decoder writes for `src_ids`.
    The encoder runs once; the decoder reruns on the growing target."""
    device = next(model.parameters()).device
    src = _as_batch(src_ids, device, "the source")[:, -model.cfg.max_seq_len:]
    with _eval_mode(model), torch.no_grad():
        memory = model.encode(src)
        return _greedy(lambda tgt: model.decode(tgt, memory),
                       torch.tensor([[bos]], device=device), max_new_tokens,
                       model.cfg.max_seq_len, eos)


# ----------------------------------------------------------------------------------------------
# `llmtrain generate`


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    from llmtrain.train.export import load_checkpoint_model, resolve_checkpoint, run_tokenizer
    path, cfg, run_dir = resolve_checkpoint(args.checkpoint, args.config)
    model = load_checkpoint_model(path, cfg, "cuda" if torch.cuda.is_available() else "cpu")
    tok = run_tokenizer(cfg, run_dir)
    ids = tok.encode(args.prompt)
    if cfg.model.arch == "encoder_decoder":
        # T5: the source ends in eos; the decoder starts from the pad token (eos without one)
        bos = tok.pad if tok.pad >= 0 else tok.eos
        new = greedy_encoder_decoder(model, ids + [tok.eos], args.max_new_tokens, bos, tok.eos)
    else:
        new = greedy_decoder(model, ids, args.max_new_tokens, tok.eos)
    print(tok.decode(new))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="greedy continuation of a prompt by a checkpointed model",
        description="Load <run_dir>/config.yaml and the model weights of CHECKPOINT "
                    "(<run_dir>/checkpoints/step_<N>, or <run_dir>: its newest good "
                    "checkpoint) and print the greedy continuation of --prompt (for an "
                    "encoder-decoder: the output for --prompt as source).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or run directory")
    p.add_argument("--config", help="run config (default: the run's config.yaml)")
    p.add_argument("--prompt", required=True, help="text to continue (encoder-decoder: source)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=cmd_generate)
