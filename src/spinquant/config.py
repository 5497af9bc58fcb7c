"""Typed settings: one tree of dataclasses flows from the CLI (or Python caller) to every algorithm."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Literal

from .errors import SpinQuantError

DEFAULT_MODEL = "smollm2-135m"  # the embedded default (models/builtin.py): works offline in minutes
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
TABLE_DTYPES = ("int8", "float16", "bfloat16", "float32")  # how a saved model stores embedding and lm_head
STE_KINDS = ("clipped", "identity")  # straight-through gradients of a quantizer (quant.quantizer.quantize_codes)


class RotationMode(str, Enum):
    """Where R1/R2 come from. A str, so configs, JSON and CLI values stay the plain words."""

    NONE = "none"  # no rotation at all (no R3/R4 either)
    HADAMARD = "hadamard"  # random Hadamard (QuaRot)
    RANDOM = "random"  # Haar-random orthogonal
    LEARNED = "learned"  # Cayley SGD from a random Hadamard start, or loaded from a rotation file

    def __str__(self) -> str:
        return self.value

    @property
    def rotates(self) -> bool:
        return self is not RotationMode.NONE

    @property
    def needs_hadamard(self) -> bool:
        """R1/R2 built from Hadamard matrices (learned ones start there), so the sizes must have one."""
        return self in (RotationMode.HADAMARD, RotationMode.LEARNED)

WeightMethod = Literal["rtn", "gptq"]


@dataclass
class QuantSpec:
    """How one kind of tensor is quantized. bits=16 means 'left in floating point'."""

    bits: int = 16
    symmetric: bool = True
    group_size: int | None = None  # None: a whole row (weights: per output channel; activations: per token)
    clip_ratio: float = 1.0  # fixed range shrink (activations, KV)
    clip_search: bool = False  # weights: grid-search the shrink that minimises reconstruction error
    full_range: bool = False  # symmetric weights: all 2^b levels, largest |w| at -2^(b-1) (llama.cpp's Q4_0 grid)

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def validate(self, what: str) -> None:
        if self.bits not in VALID_BITS:
            raise SpinQuantError(
                f"{what} bits = {self.bits} is not supported; use 2-8, or 16 to leave {what} unquantized"
            )
        if self.group_size is not None and self.group_size <= 0:
            raise SpinQuantError(
                f"{what} group size {self.group_size} must be positive; omit it for per-channel quantization"
            )
        if not (math.isfinite(self.clip_ratio) and 0.0 < self.clip_ratio <= 1.0):
            raise SpinQuantError(f"{what} clip ratio {self.clip_ratio} must be in (0, 1]; 1.0 means no clipping")
        if self.full_range and not self.symmetric:
            raise SpinQuantError(f"{what}: the full-range grid is a symmetric one; drop the asymmetric option "
                                 "or the full-range one")


def _weight_spec() -> QuantSpec:
    return QuantSpec(bits=4, symmetric=True, clip_search=True)


def _act_spec() -> QuantSpec:
    return QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)


def _kv_spec() -> QuantSpec:
    return QuantSpec(bits=4, symmetric=False, clip_ratio=0.95)


LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")  # a decoder layer's linears, as the adapters name them


def split_role_key(key: str) -> tuple[str, int | None]:
    """'down' → ("down", None): every layer's down; 'down.3' → ("down", 3): layer 3's only."""
    role, _, layer = key.partition(".")
    if role not in LINEAR_ROLES or (layer and not layer.isdigit()):
        raise SpinQuantError(f"weight role {key!r} is unknown; use one of {', '.join(LINEAR_ROLES)}, optionally "
                             "with a layer index (down.3)")
    return role, int(layer) if layer else None


def weight_specs(weight: QuantSpec, role_bits: dict[str, int]) -> dict[str, QuantSpec]:
    """Every linear role's weight grid: `weight`, with the bits `role_bits` names replaced. Keys are a role
    ("down": all layers) or a role in one layer ("down.3"); look a linear up with `layer_spec`."""
    return {**{role: weight for role in LINEAR_ROLES},
            **{key: replace(weight, bits=bits) for key, bits in role_bits.items()}}


def layer_spec(specs: dict[str, QuantSpec], layer: int, role: str) -> QuantSpec:
    """The grid of layer `layer`'s `role` linear in `weight_specs`'s dict: its own entry, else its role's."""
    return specs.get(f"{role}.{layer}", specs[role])


@dataclass
class QuantConfig:
    """Weights, activations (input of every linear but lm_head), and the K / V cache."""

    weight: QuantSpec = field(default_factory=_weight_spec)
    act: QuantSpec = field(default_factory=_act_spec)
    key: QuantSpec = field(default_factory=_kv_spec)
    value: QuantSpec = field(default_factory=_kv_spec)
    weight_method: WeightMethod = "rtn"
    # other bits for some linears: a role in every layer ("down") or in one layer ("v.3"), e.g. {"down": 4, "v.0": 8}
    weight_role_bits: dict[str, int] = field(default_factory=dict)

    def weight_specs(self) -> dict[str, QuantSpec]:
        return weight_specs(self.weight, self.weight_role_bits)

    def validate(self) -> None:
        self.weight.validate("weight")
        for role, bits in self.weight_role_bits.items():
            split_role_key(role)
            if not self.weight.enabled or not 2 <= bits <= 8:
                raise SpinQuantError(f"{role} weight bits = {bits}: per-role bits must be 2-8, with --w-bits "
                                     "below 16 as well")
        self.act.validate("activation")
        self.key.validate("key-cache")
        self.value.validate("value-cache")
        if self.weight_method not in ("rtn", "gptq"):
            raise SpinQuantError(f"weight method {self.weight_method!r} is unknown; use rtn or gptq")

    @property
    def label(self) -> str:
        """W4A4KV4-style name; KV shows the key bits (value bits too when they differ)."""
        kv = f"{self.key.bits}" if self.key.bits == self.value.bits else f"{self.key.bits}/{self.value.bits}"
        return f"W{self.weight.bits}A{self.act.bits}KV{kv}"


@dataclass
class RotationConfig:
    """R1/R2 (merged into weights) and the online Hadamards R3 (Q/K) and R4 (down_proj input)."""

    mode: RotationMode = RotationMode.HADAMARD
    # R1 on the residual stream. Off: R2 alone, norms left unfused and a tied model's one table kept (what a
    # weights-only GGUF target wants: llama.cpp then reads one table, not two).
    r1: bool = True
    r3: bool = True
    r4: bool = True
    rotation_file: str | None = None  # with mode=learned: reuse saved rotations instead of training
    save_file: str | None = None

    def __post_init__(self) -> None:
        try:
            self.mode = RotationMode(self.mode)
        except ValueError:
            raise SpinQuantError(f"rotation {self.mode!r} is unknown; use "
                                 f"{', '.join(m.value for m in RotationMode)}") from None

    def validate(self) -> None:
        self.__post_init__()  # a mode assigned after construction is checked here
        if self.rotation_file and self.mode != RotationMode.LEARNED:
            raise SpinQuantError("--rotation-file only applies to --rotation learned; add --rotation learned")


@dataclass(frozen=True)
class QuantizedAs:
    """What a model was quantized with, as the pipeline recorded it on the model (`from_config`): saving
    and exporting write these specs as they are, never re-inferred from the installed modules."""

    weight: QuantSpec
    act: QuantSpec
    key: QuantSpec
    value: QuantSpec
    weight_method: str
    rotation: RotationMode
    r3: bool  # online Hadamard on Q/K (with any rotation but none)
    r4: bool  # online Hadamard before down_proj
    weight_role_bits: tuple[tuple[str, int], ...] = ()  # roles whose weights have other bits than `weight`

    def weight_specs(self) -> dict[str, QuantSpec]:
        return weight_specs(self.weight, dict(self.weight_role_bits))

    @classmethod
    def from_config(cls, cfg: RunConfig) -> QuantizedAs:
        """The record of a run's quantization (a copy: later edits of cfg do not change it); weights left
        in float are recorded as the plain 16-bit spec."""
        from copy import deepcopy

        q, rot = deepcopy(cfg.quant), cfg.rotation
        mode = RotationMode(rot.mode)
        return cls(weight=q.weight if q.weight.enabled else QuantSpec(bits=16), act=q.act, key=q.key,
                   value=q.value, weight_method=q.weight_method, rotation=mode, r3=mode.rotates and rot.r3,
                   r4=mode.rotates and rot.r4,
                   weight_role_bits=tuple(sorted(q.weight_role_bits.items())) if q.weight.enabled else ())


@dataclass
class TrainConfig:
    """Cayley-SGD training of R1/R2 (SpinQuant step). Defaults are the CPU preset."""

    calib_data: str = "wikitext2-valid"
    steps: int = 60
    batch: int = 2
    seq_len: int = 512
    lr: float = 1.5
    momentum: float = 0.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    for_gptq: bool | None = None  # weights in float during training (the paper's GPTQ mode); None: for GPTQ runs
    # (False trains through the weight grid even for GPTQ: a weights-only target has no other quantizer)
    # "kl": match the float model's next-token distribution (a teacher forward per step, far more signal per
    # token than the labels); "ce": next-token cross-entropy on the labels, as in the paper.
    loss: Literal["kl", "ce"] = "kl"
    clip_every: int = 10  # RTN mode: re-run the weights' clip search on the rotated weights every N steps
    # Gradient of the activation / KV quantizers where their grid clips: "identity" passes it through (the
    # reference code's choice, and better rotations here, see train.training_act_ste), "clipped" drops it.
    act_ste: Literal["clipped", "identity"] | None = None  # None: identity
    checkpoint: str | None = None  # where to keep the training state (also written on Ctrl-C / NaN)
    checkpoint_every: int = 0
    resume: str | None = None

    def validate(self) -> None:
        for name in ("steps", "batch", "seq_len"):
            if getattr(self, name) <= 0:
                raise SpinQuantError(f"training {name} must be positive, got {getattr(self, name)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise SpinQuantError(f"learning rate must be a positive number, got {self.lr}; fix --lr")
        if self.loss not in ("kl", "ce"):
            raise SpinQuantError(f"unknown training loss {self.loss!r}; use kl or ce")
        if self.clip_every <= 0:
            raise SpinQuantError(f"clip refresh interval must be positive, got {self.clip_every}")
        if self.act_ste is not None and self.act_ste not in STE_KINDS:
            raise SpinQuantError(f"unknown straight-through estimator {self.act_ste!r}; use {' or '.join(STE_KINDS)}")


PAPER_TRAIN = {"steps": 100, "batch": 8, "seq_len": 2048, "lr": 1.5}
CPU_TRAIN = {"steps": 60, "batch": 2, "seq_len": 512, "lr": 1.5}
TRAIN_PRESETS = {"paper": PAPER_TRAIN, "cpu": CPU_TRAIN}

# `quantize --target`: the flags (argparse names) of the recipe that measured best for a serving format
# (benchmarks/RESULTS.md, "GGUF"). Weights only, as llama.cpp computes activations itself; no online
# Hadamards, which llama.cpp cannot run; no R1, which would split a tied model's one table in two; GPTQ in
# groups of 32 on the format's own full-range grid, its scales fitted with the inputs' mean squares, columns
# in act order (static groups), damping 0.1. Q4_0 gives layer 0's ffn_down Q5_0 blocks, where llama.cpp's
# imatrix Q4_0 gives its first n_layer/8 Q4_1 (the same bytes or more from 16 layers on).
_GGUF_RECIPE = {"a_bits": 16, "kv_bits": 16, "no_r3": True, "no_r4": True, "rotation": "none", "w_group": 32,
                "w_full_range": True, "weight_quant": "gptq", "gptq_weighted_clip": True, "gptq_act_order": True,
                "gptq_damp": 0.1, "export": "gguf", "gguf_type": "auto", "gguf_tables": "Q8_0"}
# `spinquant:<bits>`: the most accurate recipe measured at those bits for our own packed runtime
# (benchmarks/RESULTS.md, "Perplexity by recipe", records accuracy_tuned_*): Hadamard R1/R2 with online R3/R4,
# GPTQ on 16 calibration windows in act order with weighted clip and damping 0.1, then 60 steps of scale
# tuning; at A<16 groups of 32 and half of GPTQ's objective on the quantized inputs; W4A16 per output channel
# on the full-range grid, its tables float16 as measured. About 30-40 min on this 2-core CPU for SmolLM2.
_ACCURATE_RECIPE = {"rotation": "hadamard", "weight_quant": "gptq", "gptq_samples": 16, "gptq_act_order": True,
                    "gptq_weighted_clip": True, "gptq_damp": 0.1, "tune_scales": 60}
TARGETS = {
    "gguf:Q4_0": {**_GGUF_RECIPE, "w_bits": 4, "w_bits_role": {"down.0": 5}},
    "gguf:Q5_0": {**_GGUF_RECIPE, "w_bits": 5},  # the size of llama.cpp's Q4_K_M on SmolLM2
    "spinquant:W4A4KV4": {**_ACCURATE_RECIPE, "w_bits": 4, "a_bits": 4, "kv_bits": 4, "w_group": 32,
                          "gptq_act_aware": 0.5},
    "spinquant:W4A8KV8": {**_ACCURATE_RECIPE, "w_bits": 4, "a_bits": 8, "kv_bits": 8, "w_group": 32,
                          "gptq_act_aware": 0.5},
    "spinquant:W4A16": {**_ACCURATE_RECIPE, "w_bits": 4, "a_bits": 16, "kv_bits": 16, "w_full_range": True,
                        "tables": "float16"},
}


@dataclass
class GPTQConfig:
    calib_data: str = "wikitext2-valid"
    samples: int = 128
    seq_len: int = 2048
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    weighted_clip: bool = False  # clip search weighted by the Hessian diagonal (gptq.gptq_quantize)
    # Fit each weight to the activation-quantized inputs it will multiply (GPTAQ's asymmetric objective),
    # with this weight in [0, 1] against GPTQ's own float-input objective (0: off). Without float_targets only
    # linears whose input is quantized (A < 16) change. gptq_driver._GroupHessians mixes the two.
    act_aware: float = 0.0
    # The inputs that term fits to are the float model's (a second calibration stream; GPTAQ), not the same
    # inputs before activation quantization: the quantized layers' error upstream is then fitted out too.
    float_targets: bool = False

    def validate(self) -> None:
        if self.samples <= 0 or self.seq_len <= 0:
            raise SpinQuantError("--gptq-samples and --gptq-seq-len must be positive")
        if not 0 < self.damp < 1:
            raise SpinQuantError(f"GPTQ damping {self.damp} must be in (0, 1), e.g. 0.01")
        if not 0 <= self.act_aware <= 1:
            raise SpinQuantError(f"--gptq-act-aware {self.act_aware} must be in [0, 1] (1: all weight on the "
                                 "quantized inputs)")
        if self.float_targets and self.act_aware == 0:
            raise SpinQuantError("--gptq-float-targets sets what --gptq-act-aware fits to; give it a weight "
                                 "too, e.g. --gptq-act-aware 0.5")


@dataclass
class TuneConfig:
    """End-to-end tuning of the weight scales after RTN / GPTQ (quant.scale_tuning): integer codes kept,
    every scale trained so the quantized model matches the float one's next-token distribution. 0 steps: off."""

    steps: int = 0
    lr: float = 1e-3  # Adam, on each scale's relative factor
    batch: int = 2
    seq_len: int = 512
    calib_data: str = "wikitext2-valid"

    def validate(self) -> None:
        if self.steps < 0:
            raise SpinQuantError(f"--tune-scales {self.steps} must be 0 (off) or a number of steps")
        if self.batch <= 0 or self.seq_len <= 0:
            raise SpinQuantError("scale tuning batch and window length must be positive")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SpinQuantError(f"--tune-lr {self.lr} must be a positive number, e.g. 1e-3")


@dataclass
class EvalConfig:
    data: str = "wikitext2"
    seq_len: int = 2048
    max_windows: int | None = 16
    batch_size: int = 1
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None

    def validate(self) -> None:
        if self.seq_len <= 0:
            raise SpinQuantError(f"--seq-len must be positive, got {self.seq_len}")
        if self.max_windows is not None and self.max_windows <= 0:
            raise SpinQuantError(f"--max-windows must be positive, got {self.max_windows}")


@dataclass
class RunConfig:
    """Everything one `spinquant` run needs."""

    model: str = DEFAULT_MODEL
    quant: QuantConfig = field(default_factory=QuantConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"  # compute device: auto (CUDA when present), cpu, cuda, cuda:N
    offload: bool = False  # keep the model in CPU memory; decoder layers visit `device` one at a time
    threads: int | None = None  # CPU intra-op threads; None: torch's (one per core); 0: the idle cores (CLI "auto")
    output: str | None = None
    overwrite: bool = False
    # Embedding / lm_head storage, applied by quantize_model and kept by the saver: int8 (per row), float16,
    # bfloat16 or float32.
    tables: str = "int8"
    verify: bool = True  # check a saved model's sha256 manifest on load (--no-verify turns it off, logged)

    def validate(self) -> RunConfig:
        if self.device != "auto":
            import torch

            try:
                kind = torch.device(self.device).type
            except (RuntimeError, ValueError):
                kind = None
            if kind not in ("cpu", "cuda"):  # meta, mps, xpu...: nothing here is written or tested for them
                raise SpinQuantError(f"device {self.device!r} is not supported; use auto, cpu, cuda or cuda:N")
        if self.threads is not None and self.threads < 0:
            raise SpinQuantError(f"threads = {self.threads}: use 1 or more, 0 for the idle cores, or None for one per core")
        if not 0 <= self.seed < 2**32:
            raise SpinQuantError(f"seed {self.seed} is out of range; use an integer from 0 to {2**32 - 1}")
        if self.tables not in TABLE_DTYPES:
            raise SpinQuantError(f"tables {self.tables!r} is unknown; use one of {', '.join(TABLE_DTYPES)}")
        self.quant.validate()
        self.rotation.validate()
        self.train.validate()
        self.gptq.validate()
        self.tune.validate()
        if self.tune.steps and not self.quant.weight.enabled:
            raise SpinQuantError("--tune-scales tunes weight scales; it needs quantized weights (--w-bits < 16)")
        if self.tune.steps and self.offload:
            raise SpinQuantError("--tune-scales trains through the whole model at once; drop --offload")
        self.eval.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def loss_curve_stem(self) -> str | None:
        """Where rotation training writes its loss curve (`<stem>.loss.csv`, `.loss.png`), if it trains."""
        if self.rotation.mode != RotationMode.LEARNED or self.rotation.rotation_file:
            return None
        return self.rotation.save_file or (f"{self.output.rstrip('/')}-rotation" if self.output else None)

