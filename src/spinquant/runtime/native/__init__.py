"""The one hand-written kernel (int4_linear.cpp), compiled on first use and cached.

`torch.utils.cpp_extension.load` builds it with the machine's C++ compiler into torch's extension cache
(~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), once per source version: later runs load the built
library in well under a second. Where no compiler or no AVX2 exists, `kernels()` returns None after one
warning and the runtime keeps its pure-PyTorch path (same results, slower decode).
SPINQUANT_NATIVE=0 turns it off.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("int4_linear.cpp")
_state: dict[str, object] = {}


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def kernels():
    """torch.ops.spinquant (int4_linear, int4_linear_float, int8_linear, quantize_rows), or None where the
    library cannot be had."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("SPINQUANT_NATIVE", "1") != "0" and _cpu_has_avx2():
        try:
            from torch.utils.cpp_extension import load

            load(name="spinquant_native", sources=[str(_SOURCE)], is_python_module=False, verbose=False,
                 extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"])
            _register_fakes()
            module = torch.ops.spinquant
        except Exception as e:  # noqa: BLE001 - no compiler, no headers, a failed build: fall back, saying why
            warnings.warn(f"spinquant: the native int4 kernel is unavailable ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); the runtime uses the "
                          "slower PyTorch path", stacklevel=2)
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
