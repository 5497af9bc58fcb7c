"""The decode step of the packed runtime: one token at a time over a static quantized KV cache.

Decoding through the Hugging Face modules costs about a thousand small op calls per token, which on a CPU
is most of the time once the weights are read by the native kernel. Here the step of one decoder layer is
a plain function over that layer's tensors (about 40 ops, the linears, KV quantization and attention as
native ops that read the packed codes), the same function for every layer, optionally compiled with
torch.compile. The prompt runs through the model's own forward (the exact path evaluation uses); its
quantized K/V codes are then copied into the static cache. Decoding computes the same quantities as the
model's forward, in another float order (attention, RMSNorm), so its logits agree to float rounding
amplified by the activation quantizers, not bit for bit.

The step reads the model's parts through the adapter and the runtime modules' own buffers: nothing here
knows a checkpoint format. `DecodeEngine.unsupported(model)` says where it does not apply (batch 1, the native linear
kernels, full attention); elsewhere generation keeps transformers' `generate`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import native
from ..config import QuantSpec
from ..models import model_parts
from ..rotation.hadamard import hadamard_base
from .modules import Int4Linear, IntLinear, LinearSlice, native_linear

BUCKET = 256  # the static cache grows in steps of this many positions (one compiled graph per size)


@dataclass(frozen=True)
class LinearPlan:
    """What a compiled step needs to know about one runtime linear (all of it static)."""

    kind: str  # "int4" (Int4Linear) or "int8" (per-channel IntLinear on the native kernel)
    act: QuantSpec | None
    group: int
    hadamard: bool


def _linear_plan(module) -> tuple[LinearPlan, dict[str, torch.Tensor]] | None:
    if isinstance(module, Int4Linear):
        plan = LinearPlan("int4", module.act, module.group, module.hadamard)
    elif isinstance(module, IntLinear) and module.native and not module.group:
        plan = LinearPlan("int8", module.act, module.in_features, module.hadamard)
    else:
        return None
    tensors = module.kernel_tensors()
    if plan.hadamard:  # R4 on the input: the native butterfly transform needs H_K's base matrix
        tensors["hadamard"] = hadamard_base(module.in_features)
    return plan, tensors


def run_linear(plan: LinearPlan, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The runtime linear through torch.ops.spinquant (traceable); x is [rows, in]."""
    if plan.hadamard:
        x = torch.ops.spinquant.hadamard_rows(x, t["hadamard"])
    return native_linear(plan.kind, plan.act, plan.group, t, x)


@dataclass(frozen=True)
class StepPlan:
    """Static facts of the decode step, the same for every layer."""

    qkv: LinearPlan
    o: LinearPlan
    gate_up: LinearPlan
    down: LinearPlan
    sizes: tuple[int, int, int]  # q, k, v widths
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float
    rotate_q: bool
    key: QuantSpec
    value: QuantSpec
    qk_norm: bool


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.spinquant.rms_norm(x, weight, eps)


def layer_step(p: StepPlan, t: dict[str, torch.Tensor], x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
    """One decoder layer for one token. x [1, hidden]; pos a 1-element int64 tensor; cos/sin [1, head_dim].
    Writes this token's K/V codes into t's cache tensors, then attends over positions 0 .. pos."""
    h = _rms(x, t["norm1"], p.eps)
    qkv = run_linear(p.qkv, t["qkv"], h)
    nq, nk, _ = p.sizes
    # Queries and keys side by side as heads + kv_heads rows: RoPE and R3 are one op each over both.
    qk = qkv[:, :nq + nk].reshape(p.heads + p.kv_heads, p.head_dim)
    v = qkv[:, nq + nk:].reshape(p.kv_heads, p.head_dim)
    if p.qk_norm:
        qk = torch.cat((_rms(qk[:p.heads].contiguous(), t["q_norm"], p.eps),
                        _rms(qk[p.heads:].contiguous(), t["k_norm"], p.eps)))
    qk = torch.ops.spinquant.rope(qk, cos, sin)
    if p.rotate_q:  # R3: the cache holds rotated keys; rotating the queries too leaves Q·Kᵀ unchanged
        qk = torch.ops.spinquant.hadamard_rows(qk, t["r3"])
    q, k = qk[:p.heads].contiguous(), qk[p.heads:].contiguous()
    k_bits = p.key.bits if p.key.enabled else 16
    v_bits = p.value.bits if p.value.enabled else 16
    # This token's K/V quantized (as the model's QuantKVCache does) and written at `pos` in one native call each.
    torch.ops.spinquant.kv_append(k, t["k_codes"], t["k_scale"], t["k_zero"], pos, k_bits, p.key.symmetric,
                                  p.key.clip_ratio)
    torch.ops.spinquant.kv_append(v.contiguous(), t["v_codes"], t["v_scale"], t["v_zero"], pos, v_bits,
                                  p.value.symmetric, p.value.clip_ratio)
    attn = torch.ops.spinquant.decode_attention(
        q, t["k_codes"], t["k_scale"], t["k_zero"], k_bits, p.key.symmetric, t["v_codes"], t["v_scale"],
        t["v_zero"], v_bits, p.value.symmetric, pos, p.scaling).reshape(1, p.heads * p.head_dim)
    x = x + run_linear(p.o, t["o"], attn)
    h = _rms(x, t["norm2"], p.eps)
    gu = run_linear(p.gate_up, t["gate_up"], h)
    return x + run_linear(p.down, t["down"], torch.ops.spinquant.silu_mul(gu))


class DecodeEngine:
    """Greedy or sampled generation for a packed runtime model (batch 1) with its own decode step."""

    def __init__(self, model, compile: bool = False):
        why = self.unsupported(model)
        if why:
            raise ValueError(f"the decode step does not apply: {why}")
        self.model = model
        parts = model_parts(model)
        self.parts = parts
        layers = parts.layers
        first = layers[0]
        qkv_owner = first.q._owner[0]
        gate_owner = first.gate._owner[0]
        attention = first.attention
        key, value, rotate = model.spinquant_kv
        self.plan = StepPlan(
            qkv=_linear_plan(qkv_owner.fused)[0], o=_linear_plan(first.o)[0], gate_up=_linear_plan(gate_owner.fused)[0],
            down=_linear_plan(first.down)[0], sizes=tuple(qkv_owner.sizes), mlp=gate_owner.sizes[0],
            heads=parts.num_heads, kv_heads=parts.num_kv_heads, head_dim=parts.head_dim,
            scaling=float(getattr(attention, "scaling", parts.head_dim ** -0.5)),
            eps=float(first.input_norm.variance_epsilon), rotate_q=bool(rotate), key=key, value=value,
            qk_norm=hasattr(attention, "q_norm"))
        self.tensors = []
        for layer in layers:
            t = {"norm1": layer.input_norm.weight, "norm2": layer.post_attention_norm.weight,
                 "qkv": _linear_plan(layer.q._owner[0].fused)[1], "o": _linear_plan(layer.o)[1],
                 "gate_up": _linear_plan(layer.gate._owner[0].fused)[1], "down": _linear_plan(layer.down)[1]}
            if self.plan.rotate_q:
                t["r3"] = hadamard_base(parts.head_dim)
            if self.plan.qk_norm:
                t["q_norm"], t["k_norm"] = layer.attention.q_norm.weight, layer.attention.k_norm.weight
            self.tensors.append(t)
        self.final_norm = parts.final_norm
        self.capacity = 0
        # torch.compile of the step (inductor) measured no faster than eager on a 2-core CPU once the layer's
        # heavy parts are native ops (benchmarks/RESULTS.md), and costs 10-15 s the first time: opt-in.
        self.step = torch.compile(layer_step, dynamic=False, fullgraph=True) if compile else layer_step

    @staticmethod
    def unsupported(model) -> str | None:
        """Why the step cannot run this model (None when it can)."""
        if not hasattr(model, "spinquant_kv"):
            return "not a packed spinquant runtime model"
        if not native.available():
            return "the native kernel is not built"
        if next(model.parameters(), torch.empty(0)).device.type != "cpu":
            return "the model is not on the CPU"
        cfg = model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False \
                and getattr(cfg, "model_type", "") == "mistral":
            return "sliding-window attention"
        parts = model_parts(model)
        for layer in parts.layers:
            q, gate = layer.q, layer.gate
            if not (isinstance(q, LinearSlice) and isinstance(gate, LinearSlice)):
                return "q/k/v and gate/up are not fused"
            for module in (q._owner[0].fused, layer.o, gate._owner[0].fused, layer.down):
                if _linear_plan(module) is None:
                    return f"{type(module).__name__} has no native kernel here"
        return None

    # ----------------------------------------------------------------------------------------- cache

    def _allocate(self, capacity: int) -> None:
        p = self.plan
        for t in self.tensors:
            for name, spec in (("k", p.key), ("v", p.value)):
                if spec.enabled:
                    width = p.head_dim // 2 if spec.bits <= 4 else p.head_dim
                    t[f"{name}_codes"] = torch.zeros(p.kv_heads, capacity, width, dtype=torch.uint8)
                    t[f"{name}_scale"] = torch.ones(p.kv_heads, capacity, 1)
                    t[f"{name}_zero"] = torch.zeros(p.kv_heads, capacity, 1) if not spec.symmetric else torch.empty(0)
                else:
                    t[f"{name}_codes"] = torch.zeros(p.kv_heads, capacity, p.head_dim)
                    t[f"{name}_scale"] = t[f"{name}_zero"] = torch.empty(0)
        self.capacity = capacity
        rotary = next(m for name, m in self.model.named_modules() if name.endswith("rotary_emb"))  # as build_model
        positions = torch.arange(capacity).unsqueeze(0)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
        self.cos, self.sin = cos[0], sin[0]

    def _load_prompt_cache(self, cache) -> None:
        """Copy the prompt's K/V codes from the eager QuantKVCache into the static one."""
        for t, layer in zip(self.tensors, cache.layers):
            for name, store in (("k", layer._k), ("v", layer._v)):
                n = store.length
                t[f"{name}_codes"][:, :n] = store.data[0, :, :n]
                if store.scale is not None:
                    t[f"{name}_scale"][:, :n] = store.scale[0, :, :n]
                if store.zero is not None:
                    t[f"{name}_zero"][:, :n] = store.zero[0, :, :n]

    # ---------------------------------------------------------------------------------------- decode

    def forward_token(self, token: int, pos: int) -> torch.Tensor:
        """Logits [vocab] after feeding `token` at position `pos` (the cache holds positions < pos)."""
        x = self.parts.embedding(torch.tensor([token]))
        where = torch.tensor([pos])
        cos, sin = self.cos[pos:pos + 1], self.sin[pos:pos + 1]
        for t in self.tensors:
            x = self.step(self.plan, t, x, where, cos, sin)
        return self.parts.lm_head(self.final_norm(x))[0]

    def begin(self, input_ids: torch.Tensor, total: int) -> torch.Tensor:
        """Run the prompt [1, n] through the model's own forward, fill the static cache (room for `total`
        positions); returns the last position's logits [vocab]."""
        if input_ids.shape[0] != 1:
            raise ValueError("the decode step runs batch 1")
        if total > self.capacity:
            self._allocate(-(-total // BUCKET) * BUCKET)
        cache = self.model.new_cache()
        out = self.model(input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        self._load_prompt_cache(cache)
        return out.logits[0, -1]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_ids: tuple[int, ...] = (), on_token=None) -> list[int]:
        """New token ids after `input_ids` [1, n]; on_token(id) is called as each one is chosen."""
        n = input_ids.shape[1]
        logits = self.begin(input_ids, n + max_new_tokens)
        new: list[int] = []
        for i in range(max_new_tokens):
            token = _choose(logits, temperature)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos_token_ids or i == max_new_tokens - 1:
                break
            logits = self.forward_token(token, n + i)
        return new


def _choose(logits: torch.Tensor, temperature: float) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1))


def engine_for(model, compile: bool = False) -> DecodeEngine | None:
    """The model's decode engine (built once and kept on the model), or None where it does not apply."""
    engine = getattr(model, "_spinquant_decode", None)
    if engine is not None:
        return engine
    if DecodeEngine.unsupported(model) is not None:
        return None
    try:
        engine = DecodeEngine(model, compile=compile)
    except Exception as e:  # noqa: BLE001 - fall back to transformers' generate, saying why once
        warnings.warn(f"spinquant: the decode step is unavailable ({type(e).__name__}: {e}); using eager generate",
                      stacklevel=2)
        return None
    model._spinquant_decode = engine
    return engine
