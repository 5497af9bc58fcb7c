"""Rotation-training step time on a Llama-3-8B-shaped model with random weights (no download), meant for one GPU.

    python benchmarks/bench_train_gpu.py                 # 32 layers, hidden 4096, 8 × 2048 tokens, W4A4KV4
    python benchmarks/bench_train_gpu.py --layers 8      # shrink the depth if memory is short
    python benchmarks/bench_train_gpu.py --tiny          # the same code on a small config on the CPU (smoke test)

The model is built directly on the device in bf16 and taken through the pipeline's own steps (untie, fuse
norms, R4 and R3 installed), then trained exactly as `train_rotations` does it: RotatedLinear wrappers, the KL
loss against a float teacher forward (or CE), STE fake quantization of weights (RTN mode: the clip-searched W4
grid in the loop), activations and KV, bf16 autocast, gradient checkpointing, Cayley SGD on R1/R2.

Reported: seconds per step (1 warm-up step, then the mean of the timed steps), achieved TFLOP/s and MFU
against the bf16 dense peak, peak device memory, the weight clip search (run every `clip_every` steps), and
the projected time of the paper's 100-step recipe. FLOPs are model FLOPs: 6·N·tokens for the forward and
backward plus 2·N·tokens for the teacher forward of the KL loss, N = the parameters of every matmul (decoder
linears and lm_head; not the embedding lookup); attention scores, the W·R rebuilds, the fake quantizers and
the recomputation of gradient checkpointing are not counted, so they show up as lost MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import torch

H200_BF16_TFLOPS = 989.0  # dense bf16 peak (H100/H200 SXM)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small config on the CPU: checks the script, not speed")
    p.add_argument("--device", default="auto")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--loss", choices=("kl", "ce"), default="kl")
    p.add_argument("--weight-quant", choices=("rtn", "gptq"), default="rtn",
                   help="rtn: W4 (clip-searched) in the loop; gptq: train at W16 as the GPTQ recipe does")
    p.add_argument("--no-checkpointing", action="store_true", help="keep all activations (more memory)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="recompute only every N-th layer (less recompute, more memory)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="bf16 dense peak for MFU")
    p.add_argument("--recipe-steps", type=int, default=100)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = p.parse_args(argv)
    if a.tiny:
        a.device = "cpu" if a.device == "auto" else a.device
        a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab = 2, 128, 384, 4, 2, 512
        a.batch, a.seq_len = 2, 32
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(a, device: torch.device):
    """Random bf16 weights made on the device; norms randomised so that fusing them does something."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                         max_position_embeddings=max(8192, a.seq_len), rope_theta=500000.0,
                         tie_word_embeddings=False)
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


def run(a) -> dict:
    from spinquant.cayley import CayleySGD, lr_schedule
    from spinquant.config import QuantConfig, RunConfig
    from spinquant.models import model_parts
    from spinquant.pipeline import install_modules, set_activation_quant
    from spinquant.rotate import prepare
    from spinquant.rotations import make_rotations
    from spinquant.train import RotationParams, _Installed, _train_step, training_weight_spec

    device = torch.device(a.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    t = time.perf_counter()
    model = build_model(a, device)
    parts = model_parts(model)
    prepare(parts)
    install_modules(parts, r3=True, r4=True)
    sync(device)
    build_s = time.perf_counter() - t

    cfg = RunConfig(device=str(device))
    cfg.quant = QuantConfig(weight_method=a.weight_quant)  # W4A4KV4
    cfg.train.batch, cfg.train.seq_len, cfg.train.loss = a.batch, a.seq_len, a.loss
    cfg.train.steps = a.recipe_steps
    cfg.train.for_gptq = a.weight_quant == "gptq"  # the paper's W16 mode, as --weight-quant's help says
    for p in model.parameters():
        p.requires_grad_(False)
    set_activation_quant(parts, cfg.quant)
    rot = RotationParams(make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers))).to(device)
    wspec = training_weight_spec(cfg)
    installed = _Installed(parts, rot, wspec)
    optimizer = CayleySGD(rot.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    scheduler = lr_schedule(optimizer, cfg.train.steps, cfg.train.schedule)
    if not a.no_checkpointing:
        enable_checkpointing(model, a.checkpoint_every)
    model.train()
    n_steps = a.warmup + a.steps
    calib = torch.randint(0, a.vocab, (n_steps * a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))

    # The clip search runs every clip_every steps; time it apart so each step measures the step alone.
    sync(device)
    t = time.perf_counter()
    if wspec.clip_search:
        installed.refresh_clip()
    sync(device)
    clip_s = time.perf_counter() - t
    cfg.train.clip_every = 10**9  # no refresh inside the timed steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(n_steps):
        sync(device)
        t = time.perf_counter()
        losses.append(_train_step(model, installed, rot, optimizer, calib, step, cfg.train, wspec, True, device))
        scheduler.step()
        sync(device)
        times.append(time.perf_counter() - t)
    installed.remove()

    step_s = sum(times[a.warmup:]) / a.steps
    tokens = a.batch * a.seq_len
    n = matmul_params(parts)
    flops = (6 + (2 if a.loss == "kl" else 0)) * n * tokens
    tflops = flops / step_s / 1e12
    refreshes = -(-a.recipe_steps // 10) if wspec.clip_search else 0  # train.py refreshes every 10 steps
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": f"L{a.layers} h{a.hidden} i{a.intermediate} heads {a.heads}/{a.kv_heads} vocab {a.vocab}",
        "matmul_params_b": n / 1e9, "tokens_per_step": tokens, "loss": a.loss,
        "trained_weight_bits": wspec.bits,
        "checkpointing": "off" if a.no_checkpointing else f"every {a.checkpoint_every} layer(s)",
        "build_s": build_s, "clip_search_s": clip_s, "step_s": step_s, "step_times_s": times,
        "tokens_per_s": tokens / step_s, "tflops": tflops, "mfu": tflops / a.peak_tflops,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "recipe_steps": a.recipe_steps,
        "recipe_minutes": (a.recipe_steps * step_s + refreshes * clip_s) / 60,
        "losses": losses,
    }


def print_table(r: dict, peak: float) -> None:
    rows = [
        ("device", r["device"]),
        ("model", f"{r['shape']} ({r['matmul_params_b']:.2f} B matmul params)"),
        ("step", (f"{r['tokens_per_step']} tokens, W{r['trained_weight_bits']}A4KV4, loss {r['loss']}, "
                  f"checkpointing {r['checkpointing']}")),
        ("build + prepare", f"{r['build_s']:.1f} s"),
        ("step time", f"{r['step_s']:.3f} s  (each: {', '.join(f'{t:.3f}' for t in r['step_times_s'])})"),
        ("throughput", f"{r['tokens_per_s']:.0f} tokens/s"),
        ("achieved", f"{r['tflops']:.4g} TFLOP/s (model FLOPs)"),
        ("MFU", f"{100 * r['mfu']:.3g} % of {peak:.0f} TFLOP/s bf16"),
        ("peak memory", "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f} GiB"),
        ("weight clip search", f"{r['clip_search_s']:.2f} s (every 10 steps)"),
        (f"{r['recipe_steps']}-step recipe", f"{r['recipe_minutes']:.1f} min (projected)"),
        ("losses", ", ".join(f"{x:.4f}" for x in r["losses"])),
        ("benchmark wall time", f"{r['wall_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("SpinQuant rotation training (benchmarks/bench_train_gpu.py)")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


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
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
