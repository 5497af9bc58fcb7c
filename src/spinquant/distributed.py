"""Rotation training on several processes (`torchrun`), on PyTorch's own machinery.

- The frozen model is sharded with FSDP2 (`fully_shard`) over its decoder layers, then the root (embedding,
  final norm, lm_head): each rank keeps 1/N of every weight on its device and all-gathers one layer at a time.
- Data parallel over calibration batches: rank r takes its contiguous slice of the same global batch, so the
  global batch is still `cfg.train.batch` and the run sees the data a single process would.
- R1/R2 are replicated; their gradients are averaged across ranks before the Cayley step, so every rank takes
  the identical step and ends with identical rotations.
- Rank 0 alone prints and writes files. After training the other ranks stop: the merge, weight quantization
  and evaluation are one process's work.

Sharding is applied to a structural copy of the model that shares every tensor's storage: FSDP2 replaces the
copy's parameters with shards (and changes its module classes), the original model is left exactly as it was
for the float64 merge that follows, and the copy is dropped after training.

gloo (CPU) and NCCL (CUDA) both work: FSDP2 supports a CPU device mesh (see `_get_device_from_mesh` in
torch/distributed/fsdp/_fully_shard/_fsdp_init.py), and frozen parameters need no reduce-scatter.

Threads within a process (`pick_threads`, end of file): a second OpenMP thread on a core another process keeps
busy stalls every parallel region of the many small ops in GPTQ and the clip search (3.6x slower for GPTQ on
one linear here, benchmarks/bench_threads.py), so the CLI can measure how busy the machine is for a moment and
use only the idle cores when asked (`--threads auto`). Not by default: the default RTN run, whose native clip
search scales even beside a busy core, measured 56 s with 2 threads and 72 s with 1 there.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import SpinQuantError
from .models import ModelParts, model_parts


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0, or a plain single-process run: the one process that prints and writes files."""
    return rank() == 0


def local_device(device: torch.device | str) -> torch.device:
    """Under torchrun each rank uses its own GPU (LOCAL_RANK); a single process keeps the device it asked for."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device | str) -> None:
    """Join the torchrun process group (idempotent; nothing to do in a single process)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise SpinQuantError("this torch build has no torch.distributed; run a single process instead of torchrun")
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Context:
    """This rank's place in a multi-process training run."""

    rank: int
    world_size: int
    device: torch.device

    def local_batch(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (equal slices: the averaged gradient is then the
        gradient of the global-batch loss)."""
        n = ids.shape[0]
        if n % self.world_size:
            raise SpinQuantError(f"the training batch of {n} does not split over {self.world_size} processes; "
                                 f"use a --train-batch that is a multiple of {self.world_size}")
        per = n // self.world_size
        return ids[self.rank * per : (self.rank + 1) * per]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of a tensor over ranks (gloo has no AVG: sum, then divide)."""
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def average_gradients(self, params) -> None:
        """Replace every gradient by its mean over ranks: all ranks then take the identical optimizer step."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)


def current(device: torch.device | str = "cpu") -> Context | None:
    """The training context under torchrun (joining the group if needed), None in a single process."""
    if not launched():
        return None
    init(device)
    return Context(dist.get_rank(), dist.get_world_size(), local_device(device))


def share_structure(module: nn.Module) -> nn.Module:
    """A copy of the module tree with its own modules, Parameter objects and hook tables but the same tensor
    storage: fully_shard may rewrite the copy's parameters, classes and hooks without touching `module`."""
    new = copy.copy(module)
    for key, value in list(new.__dict__.items()):
        if isinstance(value, (dict, set)):  # hook tables, _parameters / _buffers / _modules, non-persistent set
            new.__dict__[key] = copy.copy(value)
    new._parameters = {k: None if p is None else nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                       for k, p in module._parameters.items()}
    new._buffers = {k: None if b is None else b.detach() for k, b in module._buffers.items()}
    new._modules = {k: None if m is None else share_structure(m) for k, m in module._modules.items()}
    return new


def shard(parts: ModelParts, ctx: Context) -> ModelParts:
    """FSDP2 over the decoder layers, then the root, of a storage-sharing copy of the model (see above)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = share_structure(parts.model)
    sharded = model_parts(model)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in sharded.layers:
        fully_shard(layer.module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return sharded


@contextmanager
def gathered(module: nn.Module):
    """Inside: `module`'s own parameters are the full (unsharded) tensors, outside a forward. For reading
    weights between steps, e.g. the weight clip search; a no-op for a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def gather_fn(ctx: Context | None):
    """What _Installed uses to read a layer's weights: `gathered` when sharded, else nothing to do."""
    return gathered if ctx is not None else (lambda module: nullcontext())


# Threads within a process.

def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest is inside user)
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def idle_cores(sample_s: float = 0.1) -> float | None:
    """Cores' worth of idle CPU over the next `sample_s` seconds (None where the kernel does not say)."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_times()
    total = second[1] - first[1] if second else 0
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (second[0] - first[0]) / total


def pick_threads(requested: int | None) -> tuple[int | None, str | None]:
    """(threads, a note for the user or None): `requested` when positive; None (keep torch's: one per core, or
    OMP_NUM_THREADS) when None; with 0 ("auto") one per usable core that is idle now (at least 1)."""
    if requested:
        return requested, None
    if requested is None or os.environ.get("OMP_NUM_THREADS"):
        return None, None
    cores = usable_cores()
    idle = idle_cores()
    if idle is None or cores == 1:
        return cores, None
    threads = max(1, min(cores, round(idle)))
    if threads == cores:
        return cores, None
    return threads, (f"{idle:.1f} of {cores} cores idle (other work runs): using {threads} thread"
                     f"{'s' if threads > 1 else ''} (--threads N to choose)")
