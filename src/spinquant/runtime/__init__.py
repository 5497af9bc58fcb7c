"""The quantized runtime: packed checkpoints, integer kernels, a quantized KV cache, generation."""

from .checkpoint import load, load_quantized, save_quantized
from .kvcache import QuantKVCache
from .manifest import is_quantized_checkpoint
from .modules import Int8Embedding, IntLinear, WeightOnlyLinear

__all__ = ["Int8Embedding", "IntLinear", "QuantKVCache", "WeightOnlyLinear", "is_quantized_checkpoint", "load",
           "load_quantized", "save_quantized"]
