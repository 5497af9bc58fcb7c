"""Int8 runtime vs bf16 on a Llama-3-8B-shaped model with random weights (no download), meant for CUDA.

    python benchmarks/bench_runtime_gpu.py                        # 32 layers, hidden 4096, 2048-token prefill
    python benchmarks/bench_runtime_gpu.py --layers 4             # shrink the model
    python benchmarks/bench_runtime_gpu.py --layers 1 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --prefill 16 --decode 2 --device cpu          # syntax check on a CPU

Measures every linear shape alone (bf16 F.linear vs the int8 kernel with dynamic per-token activations,
R4 included for down_proj) and the whole model: prefill throughput (batch 1) and decode throughput
(batch 1, quantized KV cache) for bf16, W8A8 and W4A8 (W4 codes are held as int8 at run time). The
quantized models are built straight from random packed tensors through the same loader as a checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared shape helper
from llama_shape import add_shape_args, llama_config


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def random_packed_tensors(config, w_bits: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """What save_quantized would write for a model with random weights (int8 embedding and lm_head).

    Random bytes are valid packed codes (two 4-bit codes, or one 8-bit code, per byte), so nothing needs
    packing; the tensors are made on `device` so that unpacking at build time runs there too.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    per_byte = 2 if w_bits <= 4 else 1
    out: dict[str, torch.Tensor] = {}

    def rand_bytes(*shape, dtype=torch.uint8, low=0, high=256):
        return torch.randint(low, high, shape, generator=gen, device=device, dtype=dtype)

    for i in range(config.num_hidden_layers):
        for name, (n, k) in shapes.items():
            out[f"model.layers.{i}.{name}.qweight"] = rand_bytes(n, k // per_byte)
            out[f"model.layers.{i}.{name}.scale"] = torch.full((n,), 0.02 / 2 ** (w_bits - 1), device=device)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, device=device)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, device=device)
    for name in ("model.embed_tokens", "lm_head"):
        out[f"{name}.qweight"] = rand_bytes(config.vocab_size, h, dtype=torch.int8, low=-127, high=128)
        out[f"{name}.scale"] = torch.full((config.vocab_size,), 0.02 / 127, device=device)
    out["model.norm.weight"] = torch.ones(h, device=device)
    return out


def section(w_bits: int, a_bits: int, kv_bits: int, config) -> dict:
    from spinquant.config import QuantSpec
    from spinquant.runtime.manifest import FORMAT, FORMAT_VERSION, spec_to_dict

    kv = QuantSpec(kv_bits, symmetric=False, clip_ratio=0.95)
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "quantization": {"weight": spec_to_dict(QuantSpec(w_bits, True)),
                             "act": spec_to_dict(QuantSpec(a_bits, False, clip_ratio=0.9)),
                             "key": spec_to_dict(kv), "value": spec_to_dict(kv),
                             "label": f"W{w_bits}A{a_bits}KV{kv_bits}"},
            "online_hadamard": {"r3": config.hidden_size // config.num_attention_heads,
                                "r4": config.intermediate_size}}


def build(name: str, config, device: torch.device, seed: int):
    """(model, cache factory) for one config name."""
    if name == "bf16":
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
        return model, (lambda: None)
    from spinquant.runtime.model import build_model

    bits = {"w8a8": (8, 8, 8), "w4a8": (4, 8, 8), "w4a4": (4, 4, 4)}[name]
    tensors = random_packed_tensors(config, bits[0], device, seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(config, tensors, section(*bits, config), dtype=dtype).to(device)
    return model, model.new_cache


def bench_linears(config, device: torch.device, m_values: list[int], repeats: int) -> list[dict]:
    """Every distinct linear shape: bf16 F.linear vs IntLinear (int8 x int8 → int32, dynamic activations)."""
    import torch.nn.functional as F

    from spinquant.config import QuantSpec
    from spinquant.runtime.modules import IntLinear

    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [("qkv (fused)", h + 2 * kv, h, False), ("o_proj", h, h, False),
              ("gate+up (fused)", 2 * inter, h, False), ("down_proj + R4", h, inter, True),
              ("lm_head", config.vocab_size, h, False)]
    act = QuantSpec(8, symmetric=False, clip_ratio=0.9)
    float_dtype = torch.bfloat16
    rows = []
    for label, n, k, r4 in shapes:
        w = torch.randn(n, k, device=device, dtype=float_dtype) * 0.02
        lin = IntLinear(torch.randint(-8, 8, (n, k), dtype=torch.int8), torch.rand(n) * 1e-3, act,
                        hadamard=r4, dtype=float_dtype).to(device)
        for m in m_values:
            x = torch.randn(m, k, device=device, dtype=float_dtype)
            with torch.inference_mode():
                t_f = timeit(lambda x=x, w=w: F.linear(x, w), device, repeats)
                t_i = timeit(lambda x=x, lin=lin: lin(x), device, repeats)
            rows.append({"linear": label, "M": m, "N": n, "K": k, "bf16_us": t_f * 1e6, "int8_us": t_i * 1e6,
                         "speedup": t_f / t_i})
    return rows


def bench_model(name: str, config, device: torch.device, a) -> dict:
    model, new_cache = build(name, config, device, a.seed)
    vocab = config.vocab_size
    prompt = torch.randint(0, vocab, (1, a.prefill), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def prefill():
        model(prompt, cache=new_cache(), use_cache=True, logits_to_keep=1)

    def decode():
        out = model(prompt[:, :128], cache=new_cache(), use_cache=True, logits_to_keep=1)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        sync(device)
        t = time.perf_counter()
        for _ in range(a.decode):
            out = model(tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        sync(device)
        return time.perf_counter() - t

    with torch.inference_mode():
        t_prefill = timeit(prefill, device, a.repeats)
        decode()
        t_decode = min(decode() for _ in range(a.repeats))
    row = {"config": name, "prefill_tok_s": a.prefill / t_prefill, "decode_tok_s": a.decode / t_decode,
           "weights_gib": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def bench_and_free(name: str, config, device: torch.device, a) -> dict:
    """bench_model, then give the memory back before the next config is built."""
    row = bench_model(name, config, device, a)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens (batch 1)")
    p.add_argument("--decode", type=int, default=64, help="decode steps timed (batch 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--configs", default="bf16,w8a8,w4a8", help="comma list of bf16, w8a8, w4a8, w4a4")
    p.add_argument("--no-linears", action="store_true", help="skip the per-linear table")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (CPU runs only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the record (command, commit, machine, rows) here")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = llama_config(a, a.prefill + a.decode + 8)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    title = (f"Llama-3-8B-shaped ({a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, "
             f"{a.heads}/{a.kv_heads} heads, vocab {a.vocab}) on {device}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    linears = []
    if not a.no_linears:
        t = Table(title=f"per linear — {title}")
        for col in ("linear", "M", "N×K", "bf16 µs", "int8 µs", "speedup"):
            t.add_column(col, justify="left" if col == "linear" else "right")
        linears = bench_linears(config, device, [a.prefill, 1], a.repeats)
        for r in linears:
            t.add_row(r["linear"], str(r["M"]), f"{r['N']}×{r['K']}", f"{r['bf16_us']:.1f}", f"{r['int8_us']:.1f}",
                      f"{r['speedup']:.2f}×")
        console.print(t)
    rows = []
    for name in [c.strip() for c in a.configs.split(",") if c.strip()]:
        rows.append(bench_and_free(name, config, device, a))
    ref = next((r for r in rows if r["config"] == "bf16"), None)
    t = Table(title=f"whole model — {title}: prefill {a.prefill}, decode {a.decode} (batch 1)")
    for col in ("config", "prefill tok/s", "vs bf16", "decode tok/s", "vs bf16", "weights GiB", "peak GiB"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        t.add_row(r["config"], f"{r['prefill_tok_s']:.0f}",
                  f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}×" if ref else "-",
                  f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}×" if ref else "-",
                  f"{r['weights_gib']:.2f}", f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-")
    console.print(t)
    if a.json:
        from record import write_record

        write_record(a.json, device=str(device), threads=torch.get_num_threads(), rows=rows, linears=linears)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
