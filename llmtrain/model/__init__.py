"""Plain PyTorch model code (no distributed code): see transformer.py."""

from llmtrain.model.attention import Attention
from llmtrain.model.build import build_encoder_decoder, build_model
from llmtrain.model.encoder_decoder import EncoderDecoder
from llmtrain.model.mixers import SpatialGatingMixer, Synthesizer, build_mixer
from llmtrain.model.mlp import FeedForward
from llmtrain.model.norms import NoNorm, RMSNorm, build_norm
from llmtrain.model.output import MixtureOfSoftmaxes
from llmtrain.model.residual import deepnorm_alpha, deepnorm_beta, residual_layer
from llmtrain.model.rope import apply_rope, rope_cos_sin, rotate_half
from llmtrain.model.transformer import Transformer, TransformerBlock, tfixup_scale

__all__ = ["Attention", "EncoderDecoder", "FeedForward", "MixtureOfSoftmaxes", "NoNorm", "RMSNorm",
           "SpatialGatingMixer", "Synthesizer", "Transformer", "TransformerBlock", "apply_rope",
           "build_encoder_decoder", "build_mixer", "build_model", "build_norm", "deepnorm_alpha",
           "deepnorm_beta", "residual_layer", "rope_cos_sin", "rotate_half", "tfixup_scale"]
