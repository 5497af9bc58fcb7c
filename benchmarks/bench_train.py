"""Rotation-training step time: a Llama-3-8B-shaped model with random weights on one GPU, or SmolLM2 on the CPU.

    python benchmarks/bench_train.py                     # 32 layers, hidden 4096, 8 × 2048 tokens, W4A4KV4
    python benchmarks/bench_train.py --layers 8          # shrink the depth if memory is short
    python benchmarks/bench_train.py --model smollm2 --variants plain,float64,ours   # real model, CPU table
    python benchmarks/bench_train.py --tiny              # the same code on a small config on the CPU (smoke test)

Variants (one row each, same model, same batches): `ours` is the step `train_rotations` takes; `float64`
rebuilds every W·R in float64 on every forward as the reference SpinQuant code does (the "before" of the
speed work); `plain` is an ordinary forward and backward of the float network with its
weights trainable and no rotation or quantizer, the cost the step should approach.

The random model is built directly on the device in bf16 (`--model smollm2`: the real model in float32 on the
CPU, as `spinquant quantize` trains it there) and taken through the pipeline's own steps (untie, fuse norms,
R4 and R3 installed), then trained exactly as `train_rotations` does it: RotatedLinear wrappers, the KL loss
against a float teacher forward (or CE), STE fake quantization of weights (RTN mode: the clip-searched W4 grid
in the loop), activations and KV, bf16 autocast on CUDA, gradient checkpointing on the GPU, Cayley SGD on
R1/R2.

Reported: seconds per step (1 warm-up step, then the mean of the timed steps), achieved TFLOP/s and MFU
against the bf16 dense peak, peak device memory, the weight clip search (run every `clip_every` steps), and
the projected time of the paper's 100-step recipe (for `ours`). FLOPs are model FLOPs: 6·N·tokens for the forward and
backward plus 2·N·tokens for the teacher forward of the KL loss, N = the parameters of every matmul (decoder
linears and lm_head; not the embedding lookup); attention scores, the W·R rebuilds, the fake quantizers and
the recomputation of gradient checkpointing are not counted, so they show up as lost MFU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared shape helper
from llama_shape import add_shape_args, llama_config

VARIANTS = ("plain", "float64", "ours")
H200_BF16_TFLOPS = 989.0  # dense bf16 peak (H100/H200 SXM)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("random", "smollm2"), default="random",
                   help="random: the shape below with random bf16 weights; smollm2: the real model, float32")
    p.add_argument("--tiny", action="store_true", help="small random config on the CPU: checks the script, not speed")
    p.add_argument("--variants", default="ours", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (CPU runs only)")
    add_shape_args(p)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; smollm2: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; smollm2: 512)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--loss", choices=("kl", "ce"), default="kl")
    p.add_argument("--weight-quant", choices=("rtn", "gptq"), default="rtn",
                   help="rtn: W4 (clip-searched) in the loop; gptq: train at W16 as the GPTQ recipe does")
    p.add_argument("--no-checkpointing", action="store_true", help="keep all activations (more memory)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="recompute only every N-th layer (less recompute, more memory)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"dense peak for MFU (default on CUDA: {H200_BF16_TFLOPS:.0f}, the H100/H200 bf16 peak)")
    p.add_argument("--profile", action="store_true",
                   help="profile the last timed step of each variant and print its most expensive ops")
    p.add_argument("--recipe-steps", type=int, default=100)
    p.add_argument("--json", type=Path, help="also write the record (command, commit, machine, results) here")
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(a.variants) - set(VARIANTS))
    if unknown or not a.variants:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    cpu_run = a.tiny or a.model == "smollm2"
    if cpu_run and a.device == "auto":
        a.device = "cpu"  # the CPU preset's shapes; pass --device cuda to time them on a GPU
    if a.tiny:
        a.model = "random"
        a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab = 2, 128, 384, 4, 2, 512
        a.batch, a.seq_len = a.batch or 2, a.seq_len or 32
    if a.model == "smollm2":
        a.batch, a.seq_len = a.batch or 2, a.seq_len or 512  # the CPU training preset
        a.no_checkpointing = True  # train_rotations keeps activations on the CPU
    a.batch, a.seq_len = a.batch or 8, a.seq_len or 2048
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.peak_tflops is None and a.device.startswith("cuda"):
        a.peak_tflops = H200_BF16_TFLOPS
    return a


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(a, device: torch.device):
    """The model to time, in eval mode: SmolLM2 from its GGUF, or random bf16 weights made on the device
    (norms randomised so that fusing them does something)."""
    if a.model == "smollm2":
        from spinquant.loading import load_model

        model, _ = load_model()
        return model.to(device).eval()
    from transformers import LlamaForCausalLM

    config = llama_config(a, a.seq_len)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def enable_checkpointing(model, every: int) -> None:
    """Recompute decoder layers in backward (every `every`-th one; non-reentrant: R1/R2 live outside)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def matmul_params(parts) -> int:
    """Parameters that take part in a matmul: every decoder linear and lm_head."""
    n = sum(linear.weight.numel() for layer in parts.layers for linear in layer.linears().values())
    return n + parts.lm_head.weight.numel()


def float64_rebuild(installed) -> None:
    """Make every wrapper rebuild W·R in float64 on each forward, as the reference implementation does;
    `RotatedLinear` rotates in the weight's dtype instead (the float teacher skips the rotations in both)."""
    from spinquant.training.loop import RotatedLinear

    class Float64Rebuild(RotatedLinear):
        def rotated(self, dtype=None):
            w, b = super().rotated(torch.float64)
            out = self.inner.weight.dtype
            return w.to(out), None if b is None else b.to(out)

    for wrapper in installed.wrappers():
        wrapper.__class__ = Float64Rebuild


def run_variant(a, variant: str, device: torch.device) -> dict:
    from spinquant.config import QuantConfig, RunConfig
    from spinquant.models import model_parts
    from spinquant.quant.install import install_modules, set_activation_quant
    from spinquant.rotation.merge import prepare
    from spinquant.rotation.sets import make_rotations
    from spinquant.training.cayley import CayleySGD, lr_schedule
    from spinquant.training.loop import (
        RotationParams,
        _Installed,
        _train_step,
        next_token_loss,
        training_act_ste,
        training_weight_spec,
    )

    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_model(a, device)
    parts = model_parts(model)
    prepare(parts)
    install_modules(parts, r3=True, r4=True)
    sync(device)
    build_s = time.perf_counter() - t
    # Random token ids from a fixed seed: every variant sees the same batches.
    calib = torch.randint(0, model.config.vocab_size, ((a.warmup + a.steps) * a.batch, a.seq_len),
                          generator=torch.Generator().manual_seed(0))

    cfg = RunConfig(device=str(device))
    cfg.quant = QuantConfig(weight_method=a.weight_quant)  # W4A4KV4
    cfg.train.batch, cfg.train.seq_len, cfg.train.loss = a.batch, a.seq_len, a.loss
    cfg.train.steps = a.recipe_steps
    cfg.train.for_gptq = a.weight_quant == "gptq"  # the paper's W16 mode, as --weight-quant's help says
    for p in model.parameters():
        p.requires_grad_(variant == "plain")
    set_activation_quant(parts, cfg.quant)
    rot = RotationParams(make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers))).to(device)
    wspec = training_weight_spec(cfg)
    installed = _Installed(parts, rot, wspec, act_ste=training_act_ste(cfg))
    if variant == "float64":
        float64_rebuild(installed)
    optimizer = CayleySGD(rot.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    scheduler = lr_schedule(optimizer, cfg.train.steps, cfg.train.schedule)
    if not a.no_checkpointing:
        enable_checkpointing(model, a.checkpoint_every)
    model.train()
    use_bf16 = device.type == "cuda"

    def plain_step(step: int) -> float:
        ids = calib[step * a.batch:(step + 1) * a.batch].to(device)
        model.zero_grad(set_to_none=True)
        with installed.float_forward():  # backward inside too: checkpointing recomputes the same float forward
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = next_token_loss(model, ids)
            loss.backward()
        return loss.item()

    # The clip search runs every clip_every steps; time it apart so each step measures the step alone.
    sync(device)
    t = time.perf_counter()
    if wspec.clip_search and variant != "plain":
        installed.refresh_clip()
    sync(device)
    clip_s = time.perf_counter() - t
    cfg.train.clip_every = 10**9  # no refresh inside the timed steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, profile = [], [], None
    n_steps = a.warmup + a.steps
    for step in range(n_steps):
        profiling = a.profile and step == n_steps - 1
        profiler = torch.profiler.profile() if profiling else nullcontext()
        sync(device)
        t = time.perf_counter()
        with profiler:
            if variant == "plain":
                losses.append(plain_step(step))
            else:
                losses.append(_train_step(model, installed, rot, optimizer, calib, step, cfg.train, wspec,
                                          use_bf16, device))
                scheduler.step()
            sync(device)
        times.append(time.perf_counter() - t)
        if profiling:
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            profile = profiler.key_averages().table(sort_by=key, row_limit=15)
    installed.remove()

    step_s = sum(times[a.warmup:]) / a.steps
    tokens = a.batch * a.seq_len
    n = matmul_params(parts)
    teacher = variant != "plain" and a.loss == "kl"
    tflops = (6 + (2 if teacher else 0)) * n * tokens / step_s / 1e12
    refreshes = -(-a.recipe_steps // 10) if wspec.clip_search else 0  # train.py refreshes every 10 steps
    return {
        "variant": variant, "matmul_params_b": n / 1e9, "tokens_per_step": tokens,
        "loss": "ce (float)" if variant == "plain" else a.loss,
        "trained_weight_bits": 16 if variant == "plain" else wspec.bits,
        "build_s": build_s, "clip_search_s": clip_s, "step_s": step_s, "step_times_s": times,
        "tokens_per_s": tokens / step_s, "tflops": tflops, "mfu": tflops / a.peak_tflops if a.peak_tflops else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "recipe_minutes": (a.recipe_steps * step_s + refreshes * clip_s) / 60,
        "losses": losses, "profile": profile,
    }


def run(a) -> dict:
    device = torch.device(a.device)
    if a.threads and device.type == "cpu":
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for variant in a.variants:
        rows.append(run_variant(a, variant, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shape = ("SmolLM2-135M (real weights, float32)" if a.model == "smollm2" else
             f"L{a.layers} h{a.hidden} i{a.intermediate} heads {a.heads}/{a.kv_heads} vocab {a.vocab} (random bf16)")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)",
        "shape": shape, "tokens_per_step": a.batch * a.seq_len, "batch": a.batch, "seq_len": a.seq_len,
        "checkpointing": "off" if a.no_checkpointing else f"every {a.checkpoint_every} layer(s)",
        "recipe_steps": a.recipe_steps, "rows": rows,
    }


def print_table(r: dict, peak: float) -> None:
    from rich.console import Console
    from rich.table import Table

    first = r["rows"][0]
    print("SpinQuant rotation training (benchmarks/bench_train.py)")
    print(f"device {r['device']}; model {r['shape']}, {first['matmul_params_b']:.3g} B matmul params; "
          f"{r['tokens_per_step']} tokens per step ({r['batch']} × {r['seq_len']}), W4A4KV4, "
          f"checkpointing {r['checkpointing']}; benchmark wall time {r['wall_s']:.0f} s")
    plain = next((x["step_s"] for x in r["rows"] if x["variant"] == "plain"), None)
    table = Table()
    for col in ("variant", "loss", "step s", "each step s", "vs plain", "tokens/s", "TFLOP/s", "MFU",
                "peak mem GiB", "clip search s", f"{r['recipe_steps']}-step recipe"):
        table.add_column(col, justify="left" if col in ("variant", "loss", "each step s") else "right")
    for x in r["rows"]:
        table.add_row(
            x["variant"], f"{x['loss']}, W{x['trained_weight_bits']}", f"{x['step_s']:.3f}",
            ", ".join(f"{t:.2f}" for t in x["step_times_s"]),
            "-" if plain is None else f"{x['step_s'] / plain:.2f}×", f"{x['tokens_per_s']:.0f}",
            f"{x['tflops']:.4g}", "-" if x["mfu"] is None else f"{100 * x['mfu']:.3g} % of {peak:.0f}",
            "-" if x["peak_memory_gb"] is None else f"{x['peak_memory_gb']:.1f}",
            "-" if x["variant"] == "plain" else f"{x['clip_search_s']:.2f}",
            "-" if x["variant"] == "plain" else f"{x['recipe_minutes']:.1f} min")
    Console(width=200).print(table)
    for x in r["rows"]:
        print(f"losses ({x['variant']}): {', '.join(f'{v:.4f}' for v in x['losses'])}")
    for x in r["rows"]:
        if x["profile"]:
            print(f"\nprofile of the last step ({x['variant']}):\n{x['profile']}")


def main(argv=None) -> int:
    a = parse_args(argv)
    start = time.perf_counter()
    try:
        r = run(a)
    except torch.OutOfMemoryError:
        print(f"out of device memory with {a.layers} layers; rerun with --layers {max(1, a.layers // 2)} "
              "(FLOPs, MFU and the projection scale with the depth you keep)", file=sys.stderr)
        return 1
    r["wall_s"] = time.perf_counter() - start
    print_table(r, a.peak_tflops)
    if a.json:
        from record import write_record

        write_record(a.json, **r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
