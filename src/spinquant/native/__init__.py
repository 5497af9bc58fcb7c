"""The hand-written CPU kernels, compiled on first use and cached: the runtime's (int4_linear.cpp: packed
int4 and int8 linears, the activation / KV quantizer, the decode step's small ops) and the weight clip
search (clip_search.cpp). Each file says why PyTorch's own ops do not serve.

`torch.utils.cpp_extension.load` builds them with the machine's C++ compiler into torch's extension cache
(~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), once per source version: later runs load the built
library in well under a second. Where no compiler or no AVX2 exists, `kernels()` returns None after one
warning and every caller keeps its pure-PyTorch path (same results, slower).
SPINQUANT_NATIVE=0 turns it off.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

_SOURCES = [str(Path(__file__).with_name(name)) for name in ("int4_linear.cpp", "clip_search.cpp")]
_state: dict[str, object] = {}


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def kernels():
    """torch.ops.spinquant (int4_linear, int8_linear, quantize_rows, clip_search, ...), or None where the
    library cannot be had."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("SPINQUANT_NATIVE", "1") != "0" and _cpu_has_avx2():
        try:
            from torch.utils.cpp_extension import load

            load(name="spinquant_native", sources=_SOURCES, is_python_module=False, verbose=False,
                 extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"])
            _register_fakes()
            _register_gradients()
            module = torch.ops.spinquant
        except Exception as e:  # noqa: BLE001 - no compiler, no headers, a failed build: fall back, saying why
            warnings.warn(f"spinquant: the native kernels are unavailable ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); spinquant uses the "
                          "slower PyTorch paths", stacklevel=2)
    _state["module"] = module
    return module


def available() -> bool:
    return kernels() is not None


def _register_fakes() -> None:
    """Shape functions, so torch.compile traces each op as one node (runtime/decode.py)."""
    from torch.library import register_fake

    @register_fake("spinquant::quantize_rows")
    def _(x, bits, symmetric, clip, group):
        m, k = x.shape
        return (x.new_empty((m, k), dtype=torch.uint8), x.new_empty((m, k // group), dtype=torch.int32),
                x.new_empty((m, k // group)))

    @register_fake("spinquant::int4_linear")
    def _(xu, xo, sx, w, wz, sumu, sw, bias, group):
        return xu.new_empty((xu.shape[0], w.shape[0]), dtype=torch.float32)

    @register_fake("spinquant::int4_linear_float")
    def _(x, w, wz, sw, bias, group):
        return x.new_empty((x.shape[0], w.shape[0]))

    @register_fake("spinquant::decode_attention")
    def _(q, k, k_scale, k_zero, k_bits, k_sym, v, v_scale, v_zero, v_bits, v_sym, position, scaling):
        return torch.empty_like(q)

    @register_fake("spinquant::int4_linear_dynamic")
    def _(x, bits, symmetric, clip, act_group, w, wz, sumu, sw, bias, group):
        return x.new_empty((x.shape[0], w.shape[0]))

    @register_fake("spinquant::hadamard_rows")
    def _(x, base):
        return torch.empty_like(x)

    @register_fake("spinquant::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @register_fake("spinquant::rope")
    def _(x, cos, sin):
        return torch.empty_like(x)

    @register_fake("spinquant::silu_mul")
    def _(gu):
        return gu.new_empty((gu.shape[0], gu.shape[1] // 2))

    @register_fake("spinquant::kv_append")
    def _(x, codes, scale, zero, position, bits, symmetric, clip):
        return None

    @register_fake("spinquant::int8_linear")
    def _(xu, xo, sx, w, wsum, sw, bias):
        return xu.new_empty((xu.shape[0], w.shape[0]), dtype=torch.float32)


def _register_gradients() -> None:
    """hadamard_rows is linear: its gradient is the transposed transform, H_Kᵀ ⊗ S_p → H_K ⊗ S_p (S_p is
    symmetric), i.e. the same op with the base transposed. Rotation training backpropagates through R3/R4."""

    def setup_context(ctx, inputs, output):
        ctx.base = inputs[1]

    def backward(ctx, grad):
        base = ctx.base.t().contiguous() if ctx.base.numel() else ctx.base
        return torch.ops.spinquant.hadamard_rows(grad.contiguous(), base), None

    torch.library.register_autograd("spinquant::hadamard_rows", backward, setup_context=setup_context)
