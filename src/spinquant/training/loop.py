"""Learn R1 and the per-layer R2 against the quantized network's own next-token loss (SpinQuant).

The model has been prepared (untied, norms fused, R4 merged, quantizer modules installed) but R1/R2 are not
merged. During training each decoder linear is wrapped by `RotatedLinear`, which builds its effective weight
from the frozen weight and the current rotations in the compute dtype (one small matmul per linear per step,
not a float64 rebuild), fake-quantizes it with straight-through gradients and runs the layer. The embedding
output is rotated by R1 and lm_head's input rotated back by R1ᵀ, which is what merging R1 into them does.
After training the rotations are merged once, exactly, in float64 by the same code as fixed rotations.
"""

from __future__ import annotations

import csv
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..config import QuantSpec, RunConfig
from ..errors import SpinQuantError, unpickling_refusal
from ..models import LayerParts, ModelParts
from ..quant.install import set_activation_quant
from ..quant.modules import QuantLinear
from ..quant.quantizer import fake_quantize_weight, search_clip_ratio, to_groups
from ..rotation.merge import rotate_heads_in, rotate_heads_out, rotate_in, rotate_out
from ..rotation.sets import Rotations, check_orthogonal
from .cayley import CayleySGD, lr_schedule


class RotationParams(nn.Module):
    """The trainable rotations: R1 and one R2 per layer (R1 a fixed buffer when it is not trained)."""

    def __init__(self, rotations: Rotations, train_r1: bool = True):
        super().__init__()
        self.train_r1 = train_r1
        if train_r1:
            self.r1 = nn.Parameter(rotations.r1.float().clone())
        else:
            self.register_buffer("r1", rotations.r1.float().clone())
        self.r2 = nn.ParameterList(nn.Parameter(r.float().clone()) for r in rotations.r2)

    def export(self) -> Rotations:
        return Rotations(self.r1.detach().clone(), [r.detach().clone() for r in self.r2])


class RotatedLinear(nn.Module):
    """A QuantLinear whose weight is rotated (and fake-quantized) on the fly from the current R1/R2."""

    def __init__(self, inner: QuantLinear, role: str, rot: RotationParams, layer: int, head_dim: int,
                 weight_spec: QuantSpec):
        super().__init__()
        self.inner, self.role, self.layer, self.head_dim = inner, role, layer, head_dim
        self.weight_spec = weight_spec
        self.quantize = True  # False for the float teacher's forward
        self.clip_ratio: torch.Tensor | None = None  # per-row range shrink from the last clip search
        object.__setattr__(self, "rot", rot)  # shared, not a child: keeps it out of this module's params

    def rotated(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.inner.weight, self.inner.bias
        if dtype is not None:  # e.g. float64, to time the reference code's way (benchmarks/bench_train.py)
            w, b = w.to(dtype), None if b is None else b.to(dtype)
        # In the weight's dtype: a bf16 model rotates in bf16 (as autocast would), float32 ones are unchanged.
        r2, d = self.rot.r2[self.layer].to(w.dtype), self.head_dim
        r1 = self.rot.r1.to(w.dtype) if self.rot.train_r1 else None  # a fixed R1 is the identity: skip it
        if r1 is not None and self.role in ("q", "k", "v", "gate", "up"):
            w = rotate_in(w, r1)
        if self.role == "v":
            w = rotate_heads_out(w, r2, d)
            b = None if b is None else rotate_heads_out(b, r2, d)
        elif self.role == "o":
            w = rotate_heads_in(w, r2, d)
        if r1 is not None and self.role in ("o", "down"):
            w = rotate_out(w, r1)
            b = None if b is None else rotate_out(b, r1)
        return w, b

    @torch.no_grad()
    def refresh_clip(self, grid: int = 25) -> None:
        """Clip-search the rotated weight (coarse grid) and keep the shrinks until the next refresh: training
        then sees the range choice the final quantizer makes, without a full search on every step."""
        spec = self.weight_spec
        if spec.enabled and spec.clip_search:
            w = to_groups(self.rotated()[0].float(), spec.group_size)
            self.clip_ratio = search_clip_ratio(w, spec.bits, spec.symmetric, grid=grid, full_range=spec.full_range)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.quantize:  # float teacher: the rotations cancel, so skip building W·R altogether
            return self.inner.weight, self.inner.bias
        w, b = self.rotated()
        return fake_quantize_weight(w, self.weight_spec, self.clip_ratio), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.effective()
        return self.inner(x, weight=w.to(x.dtype), bias=None if b is None else b.to(x.dtype))


@dataclass
class TrainResult:
    rotations: Rotations
    losses: list[float] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


class _Installed:
    """Puts the training wrappers and hooks in place, and takes them all out again."""

    def __init__(self, parts: ModelParts, rot: RotationParams, weight_spec: QuantSpec, gather=None,
                 act_ste: str = "clipped"):
        self.parts, self.rot = parts, rot
        self.saved_ste = [(q, q.ste) for layer in parts.layers for q in _act_quantizers(layer)]
        for q, _ in self.saved_ste:
            q.ste = act_ste
        # gather(layer module) → context in which the layer's weights are whole (FSDP shards them between steps)
        self.gather = gather or (lambda module: nullcontext())
        self.swaps: list[tuple[LayerParts, str, QuantLinear]] = []
        for layer in parts.layers:
            for role, linear in layer.linears().items():
                layer.set(role, RotatedLinear(linear, role, rot, layer.index, parts.head_dim, weight_spec))
                self.swaps.append((layer, role, linear))
        self.rotating = True  # off for the float teacher, whose rotations all cancel
        self.hooks = [] if not rot.train_r1 else [  # a fixed R1 is the identity (--no-r1)
            parts.embedding.register_forward_hook(
                lambda m, i, out: out @ rot.r1.to(out.dtype) if self.rotating else None),
            parts.lm_head.register_forward_pre_hook(
                lambda m, args: (args[0] @ rot.r1.T.to(args[0].dtype),) if self.rotating else None),
        ]

    def wrappers(self) -> list[RotatedLinear]:
        return [layer.get(role) for layer, role, _ in self.swaps]

    def refresh_clip(self) -> None:
        for layer in self.parts.layers:
            with self.gather(layer.module):
                for wrapper in layer.linears().values():
                    wrapper.refresh_clip()

    def clip_missing(self) -> bool:
        return any(w.clip_ratio is None for w in self.wrappers())

    def clip_state(self) -> dict[str, torch.Tensor]:
        return {str(i): w.clip_ratio for i, w in enumerate(self.wrappers()) if w.clip_ratio is not None}

    def load_clip_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, w in enumerate(self.wrappers()):
            if str(i) in state:
                w.clip_ratio = state[str(i)]

    @contextmanager
    def float_forward(self):
        """No quantizer anywhere and no R1/R2 (they would cancel): the original float function, computed
        without building any W·R product."""
        act = [q for layer in self.parts.layers for q in _act_quantizers(layer)]
        specs = [q.spec for q in act]
        wrappers = self.wrappers()
        try:
            for q in act:
                q.spec = QuantSpec(bits=16)
            for w in wrappers:
                w.quantize = False
            self.rotating = False
            yield
        finally:
            for q, spec in zip(act, specs):
                q.spec = spec
            for w in wrappers:
                w.quantize = True
            self.rotating = True

    def remove(self) -> None:
        for q, ste in self.saved_ste:
            q.ste = ste
        for layer, role, linear in self.swaps:
            layer.set(role, linear)
        for h in self.hooks:
            h.remove()


def _act_quantizers(layer: LayerParts):
    kv = layer.attention.kv_quant
    return [linear.inner.act_quant if isinstance(linear, RotatedLinear) else linear.act_quant
            for linear in layer.linears().values()] + [kv.key_quant, kv.value_quant]


def training_weight_spec(cfg: RunConfig) -> QuantSpec:
    """The weight quantizer inside the training loop.

    RTN runs: the final RTN grid, clip search included (re-run every `clip_every` steps); rotations trained
    through min-max rounding lean on it and lose their gain once the clip search picks other ranges. GPTQ
    runs: weights left in float (the paper's "for GPTQ" mode), so the rotation serves the activations and KV
    and GPTQ is free to place the weights: on SmolLM2 W4A4KV4 that gave 37.47 against 40.51 with rotations
    trained through the RTN grid and 39.13 with Hadamard (benchmarks/RESULTS.md, "Tried and dropped").
    `TrainConfig.for_gptq` overrides the choice."""
    for_gptq = cfg.train.for_gptq if cfg.train.for_gptq is not None else cfg.quant.weight_method == "gptq"
    if for_gptq or not cfg.quant.weight.enabled:
        return QuantSpec(bits=16)
    return cfg.quant.weight


def training_act_ste(cfg: RunConfig) -> str:
    """The activation / KV quantizers' straight-through gradient during training: "identity" by default.

    With "clipped", values the grid clips (the outliers the rotation must spread) send no gradient. On
    SmolLM2 W4A4KV4 (benchmarks/RESULTS.md, "Tried and dropped"), "identity" trained better rotations in both
    modes: RTN grid in the loop, WikiText-2 48.83 vs 54.91 and C4 59.06 vs 75.38; weights in float
    (for_gptq), a loss that fell (0.515 → 0.479 per-10-step mean) where "clipped" rose (0.548 → 1.302)."""
    return cfg.train.act_ste or "identity"


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distillation_loss(model: nn.Module, ids: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(float ‖ quantized) of the next-token distributions, averaged over tokens."""
    student = model(input_ids=ids, use_cache=False).logits.flatten(0, 1).float().log_softmax(-1)
    teacher = teacher_logits.flatten(0, 1).float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class _NonFinite(Exception):
    """A step's loss or gradient was NaN/inf; the rotations were not updated."""


def _train_step(model, installed: _Installed, rot: RotationParams, optimizer, calib_ids: torch.Tensor, step: int,
                tc, wspec: QuantSpec, use_bf16: bool, device, ctx: distributed.Context | None = None) -> float:
    """One Cayley-SGD step; returns the loss, raises _NonFinite (rotations untouched) on NaN/inf.

    With `ctx` (torchrun) this rank computes its slice of the global batch and the gradients are averaged
    over ranks before the step; loss and checks use the averaged values, so every rank decides alike."""
    # Batches depend only on (seed, step): a resumed run sees exactly the batches it would have.
    idx = torch.arange(step * tc.batch, (step + 1) * tc.batch) % len(calib_ids)
    ids = calib_ids[idx] if ctx is None else ctx.local_batch(calib_ids[idx])
    ids = ids.to(device)
    if wspec.clip_search and (step % tc.clip_every == 0 or installed.clip_missing()):
        installed.refresh_clip()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        if tc.loss == "kl":
            with torch.no_grad(), installed.float_forward():
                teacher = model(input_ids=ids, use_cache=False).logits
            loss = distillation_loss(model, ids, teacher)
            del teacher
        else:
            loss = next_token_loss(model, ids)
    optimizer.zero_grad(set_to_none=True)
    value = loss.detach() if ctx is None else ctx.mean(loss.detach())
    if not torch.isfinite(value):
        raise _NonFinite(f"loss became {value.item()}")
    loss.backward()
    if ctx is not None:
        ctx.average_gradients(rot.parameters())
    if not all(torch.isfinite(p.grad).all() for p in rot.parameters() if p.grad is not None):
        raise _NonFinite("a gradient became non-finite")
    if tc.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(rot.parameters(), tc.max_grad_norm)
    optimizer.step()
    return value.item()


def _device_for(cfg: RunConfig, parts: ModelParts) -> torch.device:
    """Where this process computes: the configured device when it names one, else where the model is."""
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda") if torch.cuda.is_available() else next(parts.model.parameters()).device


class _DeferredInterrupt:
    """Ctrl-C during a step takes effect at the step's end, so the saved checkpoint matches the rotations
    exactly and a resumed run reaches the same result; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = self.forced = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        print("\nspinquant: finishing this training step, then saving (Ctrl-C again to stop now)", file=sys.stderr)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train_rotations(parts: ModelParts, init: Rotations, cfg: RunConfig, calib_ids: torch.Tensor,
                    progress: bool = True, log_dir: str | Path | None = None) -> TrainResult:
    """Cayley-SGD on R1/R2 with the target quantizers in the loop; returns the learned rotations.
    calib_ids: [n, seq_len] token ids (pipeline.calibration_windows), batches taken in order."""
    from tqdm.auto import tqdm

    tc = cfg.train
    ctx = distributed.current(_device_for(cfg, parts))
    progress = progress and distributed.is_main()
    if len(calib_ids) < tc.batch:
        raise SpinQuantError(f"{len(calib_ids)} calibration sequences are fewer than one batch of {tc.batch}; "
                             "use more calibration text or a smaller --train-batch")

    frozen = {p: p.requires_grad for p in parts.model.parameters()}
    for p in parts.model.parameters():
        p.requires_grad_(False)
    set_activation_quant(parts, cfg.quant)
    if ctx is not None:  # train on an FSDP2-sharded copy; `parts` itself is left whole for the merge
        parts = distributed.shard(parts, ctx)
    model = parts.model
    device = ctx.device if ctx is not None else next(model.parameters()).device
    rot = RotationParams(init, train_r1=cfg.rotation.r1).to(device)
    wspec = training_weight_spec(cfg)
    installed = _Installed(parts, rot, wspec, gather=distributed.gather_fn(ctx), act_ste=training_act_ste(cfg))
    optimizer = CayleySGD(rot.parameters(), lr=tc.lr, momentum=tc.momentum)
    scheduler = lr_schedule(optimizer, tc.steps, tc.schedule)
    use_bf16 = device.type == "cuda"
    was_training = model.training
    model.train()  # dropout is 0 in these models; train() enables gradient checkpointing where set

    losses: list[float] = []
    first_step = 0
    if tc.resume:
        first_step, losses, clips = load_checkpoint(tc.resume, rot, optimizer, scheduler, tc.steps)
        installed.load_clip_state(clips)
    start = time.perf_counter()
    if device.type == "cpu":
        import resource

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bar = tqdm(range(first_step, tc.steps), desc="training rotations", disable=not progress, mininterval=2,
               initial=first_step, total=tc.steps)
    done = first_step  # steps whose update is in `rot`: what a checkpoint records
    stop = _DeferredInterrupt()
    try:
        with stop:
            for step in bar:
                try:
                    loss = _train_step(model, installed, rot, optimizer, calib_ids, step, tc, wspec, use_bf16,
                                       device, ctx)
                except _NonFinite as bad:
                    saved = save_checkpoint(tc.checkpoint, rot, optimizer, scheduler, done, losses,
                                            installed.clip_state())
                    raise SpinQuantError(
                        f"training {bad} at step {step}; stopped with the last good rotations"
                        + (f" saved in {saved}" if saved else "") + ". Lower --lr or use more bits"
                    ) from None
                scheduler.step()
                losses.append(loss)
                done = step + 1
                bar.set_postfix(loss=f"{loss:.3f}")
                if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                    save_checkpoint(tc.checkpoint, rot, optimizer, scheduler, done, losses, installed.clip_state())
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # After a second Ctrl-C the rotations may be mid-update: keep the last periodic checkpoint instead.
        saved = None if stop.forced else save_checkpoint(tc.checkpoint, rot, optimizer, scheduler, done, losses,
                                                         installed.clip_state())
        if saved:
            print(f"spinquant: training interrupted after step {done}; resume with --resume {saved}",
                  file=sys.stderr)
        raise
    finally:
        installed.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    good = rot.export()
    seconds = time.perf_counter() - start
    summary = {
        "steps": len(losses), "batch": tc.batch, "seq_len": tc.seq_len, "lr": tc.lr,
        "samples": len(losses) * tc.batch, "tokens": len(losses) * tc.batch * tc.seq_len,
        "seconds": seconds, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "trained_with_weight_bits": wspec.bits, "calib_data": tc.calib_data, "loss": tc.loss,
        "processes": ctx.world_size if ctx is not None else 1,
    }
    if device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        summary["peak_rss_gb"] = max(rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20
    if log_dir is not None and distributed.is_main():
        write_loss_curve(losses, Path(log_dir), overwrite=cfg.overwrite)
    return TrainResult(rotations=good, losses=losses, summary=summary)


CHECKPOINT_FORMAT = "spinquant-train-checkpoint-1"


def save_checkpoint(path, rot: RotationParams, optimizer, scheduler, step: int, losses: list[float],
                    clip_ratios: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Everything needed to continue exactly where training stopped (atomic; None when no path is set)."""
    if not path or not distributed.is_main():  # ranks hold identical state: one writer
        return None
    from ..io import atomic_path

    state = {"format": CHECKPOINT_FORMAT, "step": step, "losses": torch.tensor(losses, dtype=torch.float64),
             "rotations": rot.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "clip_ratios": clip_ratios or {}}
    with atomic_path(Path(path), overwrite=True) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path, rot: RotationParams, optimizer, scheduler,
                    total_steps: int) -> tuple[int, list[float], dict[str, torch.Tensor]]:
    """Restore a checkpoint written by save_checkpoint; refuses foreign or mismatched files."""
    path = Path(path)
    if not path.is_file():
        raise SpinQuantError(f"training checkpoint {path} not found; pass a file written by --train-checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a spinquant training checkpoint")
        rot.load_state_dict(state["rotations"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:  # noqa: BLE001 - corrupt, hostile or mismatched files all mean "cannot resume"
        raise SpinQuantError(f"cannot resume from {path} ({unpickling_refusal(e)}); it is corrupt, hostile or "
                             "from another model: start again without --resume") from None
    # Resumed state is untrusted input, checked like a rotation file before anything is trained or written.
    start = "start again without --resume"
    step, losses = state.get("step"), state.get("losses")
    if type(step) is not int or step < 0:
        raise SpinQuantError(f"{path} records step {step!r}, not a step count; it is corrupt: {start}")
    if step > total_steps:
        raise SpinQuantError(f"{path} is at step {step}, past --train-steps {total_steps}; "
                             "raise --train-steps or start again")
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or len(losses) != step:
        raise SpinQuantError(f"{path} holds a loss history that does not match its step {step}; it is corrupt: {start}")
    clips = state.get("clip_ratios", {})
    if not isinstance(clips, dict) or not all(isinstance(v, torch.Tensor) and torch.isfinite(v).all()
                                              for v in clips.values()):
        raise SpinQuantError(f"{path} holds non-finite clip ratios; it is corrupt: {start}")
    with torch.no_grad():
        for name, r in [("R1", rot.r1)] + [(f"R2[{i}]", r) for i, r in enumerate(rot.r2)]:
            check_orthogonal(f"{name} in {path}", r, start)
    return step, losses.tolist(), dict(clips)


def loss_curve_files(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    return stem.with_name(stem.name + ".loss.csv"), stem.with_name(stem.name + ".loss.png")


def write_loss_curve(losses: list[float], stem: Path, overwrite: bool = False) -> list[Path]:
    """`<stem>.loss.csv` always, `<stem>.loss.png` when matplotlib is installed; an existing one is
    replaced only with overwrite (checked before training starts, see cli._check_side_outputs)."""
    from ..io import atomic_path

    csv_path, png = loss_curve_files(stem)
    with atomic_path(csv_path, overwrite=overwrite) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows(enumerate(losses))
    written = [csv_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("quantized next-token loss")
    ax.set_title("SpinQuant rotation training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return written + [png]
