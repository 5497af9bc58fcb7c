"""Runtime replacements for the fake-quant modules: integer linears, weight-only linears, int8 embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..config import QuantSpec
from ..quant.quantizer import dequantize_codes, fake_quantize, quantize_activation
from ..rotation.hadamard import online_hadamard as hadamard
from .kernels import centered_codes, int8_matmul
from .packing import to_block32


def native_linear(kind: str, act: QuantSpec | None, group: int, t: dict[str, torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor:
    """A packed linear through torch.ops.spinquant, x float32 [rows, in] contiguous (traceable): the one call
    site of the kernels for the module forwards below and the decode step (runtime/decode.py).

    kind "int4": Int4Linear's tensors (float activations when act is None); "int8": per-channel IntLinear's.
    `t` is the module's `kernel_tensors()` (w, wz, sum, sw, bias).
    """
    ops = torch.ops.spinquant
    if kind == "int4" and act is None:
        return ops.int4_linear_float(x, t["w"], t["wz"], t["sw"], t["bias"], group)
    k = x.shape[-1]
    a_group = act.group_size if act.group_size not in (None, k) else k
    if kind == "int4":
        return ops.int4_linear_dynamic(x, act.bits, act.symmetric, act.clip_ratio, a_group, t["w"], t["wz"], t["sum"],
                                       t["sw"], t["bias"], group)
    xu, xo, sx = ops.quantize_rows(x, act.bits, act.symmetric, act.clip_ratio, a_group)
    return ops.int8_linear(xu, xo.reshape(-1), sx.reshape(-1), t["w"], t["sum"], t["sw"], t["bias"])


class IntLinear(nn.Module):
    """y = (x_int · W_intᵀ) · s_x · s_w (+ b): dynamic per-token int activations, int32 accumulation.

    `weight_int` holds codes minus their zero point (int8, one byte per weight in memory). Per-group
    scales (of the weight, the activation, or both with the same group size) run one integer matmul per
    group and sum the scaled partial results in float.
    """

    def __init__(self, weight_int: torch.Tensor, weight_scale: torch.Tensor, act: QuantSpec,
                 bias: torch.Tensor | None = None, weight_group: int | None = None, hadamard: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        n, k = weight_int.shape
        a_group = act.group_size if act.group_size not in (None, k) else None
        w_group = weight_group if weight_group not in (None, k) else None
        if a_group and w_group and a_group != w_group:
            raise ValueError("weight and activation groups differ; use WeightOnlyLinear with fake activations")
        self.in_features, self.out_features = k, n
        self.act = act
        self.group = w_group or a_group
        self.act_groups = k // a_group if a_group else 1
        self.hadamard = hadamard
        self.dtype = dtype
        groups = k // self.group if self.group else 1
        # Scales as [N] (per channel) or [weight groups, N], so a row broadcasts over a [M, N] partial result.
        scale = weight_scale.float().reshape(n, -1).t().contiguous().to(dtype)
        self.register_buffer("weight_scale", scale[0].contiguous() if scale.shape[0] == 1 else scale)
        if self.group:
            # [G, N, g]: each group's slice is a contiguous row-major block, its .t() what _int_mm wants.
            self.register_buffer("weight_int", weight_int.reshape(n, groups, self.group).transpose(0, 1).contiguous())
        else:
            self.register_buffer("weight_int", weight_int.contiguous())
        needs_sum = not act.symmetric and act.bits >= 8
        wsum = self.weight_int.sum(-1, dtype=torch.int32) if needs_sum else None  # [N] or [G, N]
        self.register_buffer("weight_sum", wsum)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        # Per channel on the CPU: the native kernel, exact, and far faster than torch._int_mm on CPUs without
        # AVX512-VNNI (benchmarks/RESULTS.md, "Tried and dropped"); it needs no weight code at -128.
        self.native = (not self.group and act.bits <= 8 and dtype == torch.float32 and k % 32 == 0
                       and (not n or int(weight_int.min()) > -128))
        if self.native:
            self.register_buffer("code_sum", self.weight_int.sum(-1, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.hadamard:  # R4: the online Hadamard runs before the activation quantizer, as in fake quant
            x2 = hadamard(x2)
        y = self._grouped(x2) if self.group else self._per_channel(x2)
        if self.bias is not None:
            y += self.bias
        y = y.reshape(*lead, self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    CHUNK = 1 << 22  # output elements per integer matmul: bounds the int32 result and oneDNN's scratch


    def kernel_tensors(self) -> dict[str, torch.Tensor | None]:
        """What `native_linear` reads (kind "int8"; per-channel layers with `native` set)."""
        return {"w": self.weight_int, "sum": self.code_sum, "sw": self.weight_scale.reshape(-1), "bias": self.bias}

    def _per_channel(self, x2: torch.Tensor) -> torch.Tensor:
        if self.native and x2.device.type == "cpu" and native.available():
            # The bias is added by forward, as on the other paths.
            return native_linear("int8", self.act, self.in_features, {**self.kernel_tensors(), "bias": None},
                                 x2.float().contiguous())
        rows = max(1, self.CHUNK // self.out_features)
        if x2.shape[0] > rows:  # e.g. a 49152-row lm_head over a long prompt: work in row blocks
            out = torch.empty(x2.shape[0], self.out_features, dtype=self.dtype, device=x2.device)
            for i in range(0, x2.shape[0], rows):
                out[i: i + rows] = self._per_channel(x2[i: i + rows])
            return out
        q, sx, zx = quantize_activation(x2, self.act)
        xi, offset = centered_codes(q, zx, self.act)
        acc = int8_matmul(xi, self.weight_int.t())
        if offset is not None:
            acc += offset.to(torch.int32) * self.weight_sum  # exact in int32, before any float rounding
        return acc.to(self.dtype).mul_(sx).mul_(self.weight_scale)

    def _grouped(self, x2: torch.Tensor) -> torch.Tensor:
        m = x2.shape[0]
        ga = self.act_groups
        q, sx, zx = quantize_activation(x2.reshape(m, ga, -1), self.act)  # scales [M, Ga, 1]
        xi, offset = centered_codes(q, zx, self.act)
        groups = self.weight_int.shape[0]
        xi = xi.reshape(m, groups, self.group).transpose(0, 1).contiguous()  # [G, M, g]
        per_group_w = self.weight_scale.dim() == 2
        y = None
        for j in range(groups):
            acc = int8_matmul(xi[j], self.weight_int[j].t())
            ja = j if ga > 1 else 0
            if offset is not None:
                acc += offset[:, ja].to(torch.int32) * self.weight_sum[j]
            part = acc.to(self.dtype).mul_(sx[:, ja])
            if per_group_w:
                part.mul_(self.weight_scale[j])
            y = part if y is None else y.add_(part)
        return y if per_group_w else y.mul_(self.weight_scale)

    def extra_repr(self) -> str:
        a = self.act
        return (f"in={self.in_features}, out={self.out_features}, act=int{a.bits}"
                f"{'' if a.symmetric else ' asym'} clip={a.clip_ratio}, group={self.group}, r4={self.hadamard}")


def int4_kernel_group(k: int, weight_group: int | None, act: QuantSpec | None) -> int | None:
    """The group size the native int4 kernel would run this layer with, or None where it does not apply
    (groups not a multiple of 32, weight and activation groups that differ, activations above 8 bits)."""
    if act is not None and act.enabled and act.bits > 8:
        return None
    a_group = act.group_size if act is not None and act.enabled and act.group_size not in (None, k) else None
    w_group = weight_group if weight_group not in (None, k) else None
    if a_group and w_group and a_group != w_group:
        return None
    group = w_group or a_group or k
    return group if group % 32 == 0 and k % group == 0 else None


class Int4Linear(nn.Module):
    """Weights of at most 4 bits kept two codes per byte and read directly by the native kernel
    (native/int4_linear.cpp): half a byte per weight in memory, one pass over it per call.

    With activation quantization (W4A8, W4A4) the input is quantized per token by `quantize_rows` (the
    fake quantizer's codes) and multiplied as exact integers, then scaled in IntLinear's order: the same
    result to the last bit. Without it (W4A16) the input stays in float32.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, weight: QuantSpec,
                 act: QuantSpec | None, group: int, bias: torch.Tensor | None = None, hadamard: bool = False):
        super().__init__()
        n, k = codes.shape
        self.in_features, self.out_features = k, n
        self.act = act if act is not None and act.enabled else None
        self.group = group
        self.hadamard = hadamard
        qmin = -(2 ** (weight.bits - 1)) if weight.symmetric else 0
        u = (codes.to(torch.int16) - qmin).to(torch.uint8)
        w_groups = scale.reshape(n, -1).shape[1]
        if zero is None:
            wz = torch.full((n, w_groups), -qmin, dtype=torch.int32)
        else:
            wz = zero.round().to(torch.int32).reshape(n, -1)
        self.register_buffer("packed", to_block32(u))
        self.register_buffer("weight_zero", wz.contiguous())
        self.register_buffer("weight_scale", scale.float().reshape(n, -1).contiguous())
        self.register_buffer("code_sum", u.to(torch.int32).reshape(n, k // group, group).sum(-1, dtype=torch.int32))
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    def kernel_tensors(self) -> dict[str, torch.Tensor | None]:
        """What `native_linear` reads (kind "int4")."""
        return {"w": self.packed, "wz": self.weight_zero, "sum": self.code_sum, "sw": self.weight_scale,
                "bias": self.bias}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native.kernels()  # built and registered on first use
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.hadamard:
            x2 = hadamard(x2)
        y = native_linear("int4", self.act, self.group, self.kernel_tensors(), x2.float().contiguous())
        y = y.reshape(*lead, self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        act = f"int{self.act.bits}" if self.act else "float"
        return (f"in={self.in_features}, out={self.out_features}, int4 packed, group={self.group}, act={act}, "
                f"r4={self.hadamard}")


class WeightOnlyLinear(nn.Module):
    """Weight-only quantized linear (W4A16 and friends), and the exact fallback for layouts the integer
    kernel does not take (then `act` fake-quantizes the input in float, as the fake-quant model does).

    mode "cached": dequantize once at load (exact; memory of the compute dtype).
    mode "otf": keep int8 codes and dequantize on every call (one byte per weight in memory).
    mode "int4pack": torch's CPU W4A16 kernel (`_weight_int4pack_mm_for_cpu`): 4-bit weights stay packed
    (half a byte per weight), activations run in bf16, so results match fake quant only to bf16 rounding.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int | None,
                 bias: torch.Tensor | None = None, act: QuantSpec | None = None, hadamard: bool = False,
                 mode: str = "cached", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = group if group not in (None, self.in_features) else None
        self.act = act if act is not None and act.enabled else None
        self.hadamard = hadamard
        self.mode = mode
        self.dtype = dtype
        if mode == "cached":
            self.register_buffer("weight", dequantize_codes(codes, scale, zero, self.group, dtype))
            for name in ("codes", "scale", "zero"):
                self.register_buffer(name, None)
        elif mode == "int4pack":
            self.register_buffer("weight", None)
            self._init_int4pack(codes, scale, zero)
        elif mode == "otf":
            self.register_buffer("weight", None)
            self.register_buffer("codes", codes.contiguous())  # int8 (int16 only for unsigned 8-bit codes)
            self.register_buffer("scale", scale.float().contiguous())
            self.register_buffer("zero", None if zero is None else zero.float().contiguous())
        else:
            raise ValueError(f"unknown weight-only mode {mode!r}")
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def _init_int4pack(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        n, k = codes.shape
        if self.act is not None or int(codes.min()) < -8 or int(codes.max()) > 15:
            raise ValueError("int4pack takes 4-bit weight-only layers")
        # The kernel computes w = (u - 8)·s + z per group with u in [0, 15]; ours is (code - zero)·s.
        unsigned = zero is not None or int(codes.min()) >= 0
        u = codes.to(torch.int32) + (0 if unsigned else 8)
        g = self.group or next(size for size in (256, 128, 64, 32, k) if k % size == 0)
        groups = k // g
        s = scale.float().reshape(n, -1).repeat_interleave(groups // scale.reshape(n, -1).shape[1], dim=1)
        z0 = (zero.float().reshape(n, -1).repeat_interleave(groups // zero.reshape(n, -1).shape[1], dim=1)
              if zero is not None else torch.zeros_like(s))
        offset = (8 - z0) * s if unsigned else torch.zeros_like(s)
        self.int4_group = g
        self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1))
        self.register_buffer("scale", torch.stack((s, offset), -1).transpose(0, 1).contiguous().bfloat16())
        self.register_buffer("zero", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = hadamard(x)
        if self.act is not None:
            x = fake_quantize(x, self.act)
        if self.mode == "int4pack":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.codes, self.int4_group, self.scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        x = x.to(self.dtype)
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if self.group is None and self.zero is None:
            # Per-channel symmetric: scale the output instead of the weight (cheaper than building W).
            y = F.linear(x, self.codes.to(self.dtype)) * self.scale.to(self.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, dequantize_codes(self.codes, self.scale, self.zero, self.group, self.dtype), self.bias)

    def extra_repr(self) -> str:
        act = f"fake int{self.act.bits}" if self.act else "16-bit"
        return (f"in={self.in_features}, out={self.out_features}, mode={self.mode}, group={self.group}, "
                f"act={act}, r4={self.hadamard}")


class FloatLinear(nn.Module):
    """A float weight (weights left at 16 bits) with the optional R4 and fake activation quantizer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, act: QuantSpec | None = None,
                 hadamard: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.act = act if act is not None and act.enabled else None
        self.hadamard = hadamard
        self.register_buffer("weight", weight.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = hadamard(x)
        if self.act is not None:
            x = fake_quantize(x, self.act)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Int8Embedding(nn.Module):
    """Embedding table as int8 codes with one float scale per row (token)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().reshape(-1).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.codes).to(self.dtype)
        return rows * self.scale[ids].unsqueeze(-1).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


class FusedInput(nn.Module):
    """Linears that read the same tensor (q/k/v, gate/up) run as one module; each role takes its slice.

    Decode is dominated by per-call overhead, not by FLOPs: one activation quantization and one integer
    matmul instead of three saves a third of the ops per layer. The output is kept until every role has
    taken its slice (the input is held too, so its identity and version cannot be reused by another
    tensor meanwhile), then dropped: held across layers it would cost a prompt's activations per layer.
    """

    def __init__(self, fused: nn.Module, sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.sizes = sizes
        self._memo: list | None = None  # [input, its version, output, slices still to serve]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        memo = self._memo
        version = _version(x)
        if memo is not None and memo[0] is x and memo[1] == version:
            y = memo[2]
            memo[3] -= 1
            if memo[3] <= 0:
                self._memo = None
            return y
        y = self.fused(x)
        self._memo = [x, version, y, len(self.sizes) - 1]
        return y

    def __getstate__(self):  # deepcopy / pickle: the memo is a cache, not state
        state = dict(self.__dict__)
        state["_memo"] = None
        return state

    def slices(self) -> list[LinearSlice]:
        out, start = [], 0
        for size in self.sizes:
            out.append(LinearSlice(self, start, start + size))
            start += size
        return out


def _version(x: torch.Tensor) -> int:
    """In-place write counter; inference-mode tensors have none (then identity alone decides)."""
    return -1 if x.is_inference() else x._version


class LinearSlice(nn.Module):
    """One role's columns of a `FusedInput` (registered on the layer, referenced here without a copy)."""

    def __init__(self, owner: FusedInput, start: int, end: int):
        super().__init__()
        self._owner = [owner]  # a list: keeps the shared module out of this module's state_dict
        self.start, self.end = start, end
        self.in_features = owner.fused.in_features
        self.out_features = end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner[0].output(x)[..., self.start: self.end]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.end} of {type(self._owner[0].fused).__name__}"
