"""Data: tokenizers, preprocessing to megatron-core indexed datasets, sample loading."""

import warnings

# megatron-core's package import warns about NVIDIA's optional CUDA extensions; we use only its
# data pipeline, which needs neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
