"""Data: tokenizers, preprocessing to megatron-core indexed datasets, sample loading."""
