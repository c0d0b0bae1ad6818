"""Build a model from its config: the family `model.arch` names (decoder-only Transformer or
EncoderDecoder), constructed on the meta device, materialised, initialised.

Its own module because it needs both families, and neither family module needs the other.
A sharded run does the same three steps with the parallel techniques in between: construct on
meta here (`device="meta"`), shard (parallel/), then materialise and initialise only each rank's
shards (parallel/init.py), with the same initial values (model/init.py).
"""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model.encoder_decoder import EncoderDecoder
from llmtrain.model.init import layout_free_init
from llmtrain.model.transformer import Transformer


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu",
                seed: int | None = None) -> nn.Module:
    """Build on the meta device (no memory); unless `device` is "meta", materialize on `device`
    and initialise from `seed` (model/init.py: the values every layout gives; None: a seed drawn
    from torch's global generator, so `torch.manual_seed(s)` before the call still fixes them).
    `model.arch` picks the family: Transformer (decoder) or EncoderDecoder."""
    cls = EncoderDecoder if cfg.arch == "encoder_decoder" else Transformer
    with torch.device("meta"):
        model = cls(cfg)
    if torch.device(device).type == "meta":
        return model
    materialize(model, device)
    layout_free_init(model, draw_seed() if seed is None else seed)
    return model


def draw_seed() -> int:
    """A seed from torch's global generator."""
    return int(torch.randint(0, 2 ** 62, ()))


def materialize(model: nn.Module, device: str | torch.device) -> None:
    """Allocate the storage of a meta model's parameters and buffers on `device`, uninitialised
    (each parameter as the module holds it: a DTensor gets its local shard only)."""
    model.to_empty(device=device)
    # to_empty allocates each module's parameter anew, untying them (a pipeline stage may hold
    # neither end)
    if model.cfg.tie_embeddings and getattr(model, "output", None) is not None \
            and getattr(model, "tok_embeddings", None) is not None:
        model.output.weight = model.tok_embeddings.weight


def build_encoder_decoder(cfg: ModelConfig, device: str | torch.device = "cpu") -> EncoderDecoder:
    """`build_model` for an encoder-decoder config."""
    return build_model(cfg, device)
