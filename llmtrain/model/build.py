"""Build a model from its config: the family `model.arch` names (decoder-only Transformer or
EncoderDecoder), constructed on the meta device, materialised, initialised.

Its own module because it needs both families, and neither family module needs the other.
"""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model.encoder_decoder import EncoderDecoder
from llmtrain.model.transformer import Transformer


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build on the meta device (no memory), materialize on `device`, initialise.
    `model.arch` picks the family: Transformer (decoder) or EncoderDecoder."""
    cls = EncoderDecoder if cfg.arch == "encoder_decoder" else Transformer
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty allocates each module's parameter anew, untying them
        model.output.weight = model.tok_embeddings.weight
    model.init_weights()
    return model


def build_encoder_decoder(cfg: ModelConfig, device: str | torch.device = "cpu") -> EncoderDecoder:
    """`build_model` for an encoder-decoder config."""
    return build_model(cfg, device)
