"""Quantizers: fake quantization with STE, the weight clip search, GPTQ, integer packing."""

from .gptq_driver import quantize_weights_gptq
from .quantizer import (
    QuantizedTensor,
    compute_qparams,
    fake_quantize,
    fake_quantize_weight,
    quantize_weight,
    round_ste,
    weight_qparams,
)

__all__ = [
    "QuantizedTensor",
    "compute_qparams",
    "fake_quantize",
    "fake_quantize_weight",
    "quantize_weight",
    "quantize_weights_gptq",
    "round_ste",
    "weight_qparams",
]
