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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cayley import CayleySGD, lr_schedule
from .config import QuantSpec, RunConfig
from .errors import SpinQuantError
from .models import LayerParts, ModelParts
from .nn import QuantLinear
from .pipeline import set_activation_quant
from .quant.quantizer import fake_quantize_weight
from .rotate import rotate_heads_in, rotate_heads_out, rotate_in, rotate_out
from .rotations import Rotations


class RotationParams(nn.Module):
    """The trainable rotations: R1 and one R2 per layer."""

    def __init__(self, rotations: Rotations):
        super().__init__()
        self.r1 = nn.Parameter(rotations.r1.float().clone())
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
        object.__setattr__(self, "rot", rot)  # shared, not a child: keeps it out of this module's params

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.inner.weight, self.inner.bias
        r1, r2, d = self.rot.r1, self.rot.r2[self.layer], self.head_dim
        if self.role in ("q", "k", "gate", "up"):
            w = rotate_in(w, r1)
        elif self.role == "v":
            w = rotate_heads_out(rotate_in(w, r1), r2, d)
            b = None if b is None else rotate_heads_out(b, r2, d)
        elif self.role == "o":
            w = rotate_out(rotate_heads_in(w, r2, d), r1)
            b = None if b is None else rotate_out(b, r1)
        elif self.role == "down":
            w = rotate_out(w, r1)
            b = None if b is None else rotate_out(b, r1)
        return fake_quantize_weight(w, self.weight_spec), b

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

    def __init__(self, parts: ModelParts, rot: RotationParams, weight_spec: QuantSpec):
        self.parts, self.rot = parts, rot
        self.swaps: list[tuple[LayerParts, str, QuantLinear]] = []
        for layer in parts.layers:
            for role, linear in layer.linears().items():
                layer.set(role, RotatedLinear(linear, role, rot, layer.index, parts.head_dim, weight_spec))
                self.swaps.append((layer, role, linear))
        self.hooks = [
            parts.embedding.register_forward_hook(lambda m, i, out: out @ rot.r1.to(out.dtype)),
            parts.lm_head.register_forward_pre_hook(lambda m, args: (args[0] @ rot.r1.T.to(args[0].dtype),)),
        ]

    def remove(self) -> None:
        for layer, role, linear in self.swaps:
            layer.set(role, linear)
        for h in self.hooks:
            h.remove()


def training_weight_spec(cfg: RunConfig) -> QuantSpec:
    """Rotations for GPTQ train at W16 (GPTQ will handle the weights); for RTN, train with min-max W quant."""
    for_gptq = cfg.train.for_gptq if cfg.train.for_gptq is not None else cfg.quant.weight_method == "gptq"
    if for_gptq or not cfg.quant.weight.enabled:
        return QuantSpec(bits=16)
    return replace(cfg.quant.weight, clip_search=False)  # the clip search is for the final weights, not each step


def calibration_ids(cfg: RunConfig, tokenizer, n_samples: int, seq_len: int) -> torch.Tensor:
    from .data import calibration_batches, load_text

    if cfg.train.calib_data == cfg.eval.data:
        raise SpinQuantError(f"calibration data {cfg.train.calib_data!r} is the evaluation text; calibrate on "
                             "other text (e.g. --calib-data wikitext2-valid)")
    return calibration_batches(load_text(cfg.train.calib_data, split_hint="train"), tokenizer, seq_len,
                               n_samples, cfg.seed)


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train_rotations(parts: ModelParts, init: Rotations, cfg: RunConfig, tokenizer=None,
                    calib_ids: torch.Tensor | None = None, progress: bool = True,
                    log_dir: str | Path | None = None) -> TrainResult:
    """Cayley-SGD on R1/R2 with the target quantizers in the loop; returns the learned rotations."""
    from tqdm.auto import tqdm

    tc = cfg.train
    model = parts.model
    device = next(model.parameters()).device
    if calib_ids is None:
        calib_ids = calibration_ids(cfg, tokenizer, tc.steps * tc.batch, tc.seq_len)
    if len(calib_ids) < tc.batch:
        raise SpinQuantError(f"{len(calib_ids)} calibration sequences are fewer than one batch of {tc.batch}; "
                             "use more calibration text or a smaller --train-batch")

    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    rot = RotationParams(init).to(device)
    wspec = training_weight_spec(cfg)
    set_activation_quant(parts, cfg.quant)
    installed = _Installed(parts, rot, wspec)
    optimizer = CayleySGD(rot.parameters(), lr=tc.lr, momentum=tc.momentum)
    scheduler = lr_schedule(optimizer, tc.steps, tc.schedule)
    use_bf16 = device.type == "cuda"
    was_training = model.training
    model.train()  # dropout is 0 in these models; train() enables gradient checkpointing where set

    losses: list[float] = []
    first_step = 0
    if tc.resume:
        first_step, losses = load_checkpoint(tc.resume, rot, optimizer, scheduler, tc.steps)
    start = time.perf_counter()
    if device.type == "cpu":
        import resource

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bar = tqdm(range(first_step, tc.steps), desc="training rotations", disable=not progress, mininterval=2,
               initial=first_step, total=tc.steps)
    step = first_step
    try:
        for step in bar:
            # Batches depend only on (seed, step): a resumed run sees exactly the batches it would have.
            idx = torch.arange(step * tc.batch, (step + 1) * tc.batch) % len(calib_ids)
            ids = calib_ids[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = next_token_loss(model, ids)
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
            grads_ok = all(torch.isfinite(p.grad).all() for p in rot.parameters() if p.grad is not None)
            if not torch.isfinite(loss) or not grads_ok:
                what = f"loss became {loss.item()}" if not torch.isfinite(loss) else "a gradient became non-finite"
                saved = save_checkpoint(tc.checkpoint, rot, optimizer, scheduler, step, losses)
                raise SpinQuantError(
                    f"training {what} at step {step}; stopped with the last good rotations"
                    + (f" saved in {saved}" if saved else "") + ". Lower --lr or use more bits"
                )
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(rot.parameters(), tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0:
                save_checkpoint(tc.checkpoint, rot, optimizer, scheduler, step + 1, losses)
    except KeyboardInterrupt:
        saved = save_checkpoint(tc.checkpoint, rot, optimizer, scheduler, step, losses)
        if saved:
            print(f"spinquant: training interrupted at step {step}; resume with --resume {saved}", file=sys.stderr)
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
        "trained_with_weight_bits": wspec.bits, "calib_data": tc.calib_data,
    }
    if device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        summary["peak_rss_gb"] = max(rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20
    if log_dir is not None:
        write_loss_curve(losses, Path(log_dir))
    return TrainResult(rotations=good, losses=losses, summary=summary)


CHECKPOINT_FORMAT = "spinquant-train-checkpoint-1"


def save_checkpoint(path, rot: RotationParams, optimizer, scheduler, step: int, losses: list[float]) -> Path | None:
    """Everything needed to continue exactly where training stopped (atomic; None when no path is set)."""
    if not path:
        return None
    from .io import atomic_path

    state = {"format": CHECKPOINT_FORMAT, "step": step, "losses": torch.tensor(losses, dtype=torch.float64),
             "rotations": rot.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    with atomic_path(Path(path), overwrite=True) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path, rot: RotationParams, optimizer, scheduler, total_steps: int) -> tuple[int, list[float]]:
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
        raise SpinQuantError(f"cannot resume from {path} ({str(e).splitlines()[0][:160]}); it is corrupt or from "
                             "another model: start again without --resume") from None
    if state["step"] > total_steps:
        raise SpinQuantError(f"{path} is at step {state['step']}, past --train-steps {total_steps}; "
                             "raise --train-steps or start again")
    return int(state["step"]), state["losses"].tolist()


def write_loss_curve(losses: list[float], stem: Path) -> list[Path]:
    """`<stem>.loss.csv` always, `<stem>.loss.png` when matplotlib is installed."""
    csv_path = stem.with_name(stem.name + ".loss.csv")
    with open(csv_path, "w", newline="") as f:
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
    png = stem.with_name(stem.name + ".loss.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return written + [png]
