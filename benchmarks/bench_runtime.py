"""CPU speed, memory and size of the packed runtime vs float, on SmolLM2-135M.

    python benchmarks/bench_runtime.py                       # fp32,bf16,w8a8,w4a8,w4a16
    python benchmarks/bench_runtime.py --configs fp32,w4a8 --prompt-len 256 --decode-tokens 32

Each config is measured in a fresh subprocess so that peak RSS belongs to that config alone. Checkpoints
are prepared once under --workdir (float ones with save_pretrained, quantized ones with
spinquant.runtime.save_quantized; Hadamard rotation, RTN) and reused on later runs unless --rebuild.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import write_record  # at the top: the record's load is the one at start

# name → (weight bits, activation bits, KV bits) for quantized configs; None for float baselines
CONFIGS: dict[str, tuple[int, int, int] | None] = {
    "fp32": None, "bf16": None,
    "w8a8": (8, 8, 8), "w4a8": (4, 8, 8), "w4a16": (4, 16, 16), "w4a4": (4, 4, 4),
    "w4a16-plain": (4, 16, 16),  # R1/R2 merged, no online R3/R4: nothing runs at inference but the linears
}
ONLINE_OFF = {"w4a16-plain"}
# W4A16 runtime variants: same checkpoint, another weight-only kernel (see runtime.modules.WeightOnlyLinear)
VARIANTS = {"w4a16-otf": ("w4a16", "otf"), "w4a16-int4": ("w4a16", "int4pack"), "w4a16-cached": ("w4a16", "cached"),
            "w4a8-cached": ("w4a8", "cached")}
DEFAULT_CONFIGS = "fp32,bf16,w8a8,w4a8,w4a4,w4a16"


def checkpoint_of(name: str) -> str:
    return VARIANTS[name][0] if name in VARIANTS else name


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). ru_maxrss is not used: Linux carries the parent's peak
    across fork + exec, so a child would report the parent's memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weights_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def prepare(names: list[str], workdir: Path, model_name: str, rebuild: bool) -> None:
    """Write every missing checkpoint (one float model load, then one deepcopy + quantize per config)."""
    import copy

    import torch

    from spinquant.config import QuantConfig, QuantSpec, RunConfig
    from spinquant.loading import load_model
    from spinquant.pipeline import quantize_model
    from spinquant.runtime import save_quantized

    names = sorted({checkpoint_of(n) for n in names})
    todo = [n for n in names if rebuild or not (workdir / n / "config.json").is_file()]
    if not todo:
        return
    base, tokenizer = load_model(model_name)
    for name in todo:
        out = workdir / name
        if out.exists():
            shutil.rmtree(out)
        t = time.perf_counter()
        bits = CONFIGS[name]
        if bits is None:
            from transformers import AutoModelForCausalLM

            dtype = torch.float32 if name == "fp32" else torch.bfloat16
            config = copy.deepcopy(base.config)
            if hasattr(config, "quantization_config"):  # GGUF source: save as a plain float model
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.load_state_dict(base.state_dict())
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        else:
            w, a, kv = bits
            cfg = RunConfig(model=model_name)
            cfg.rotation.mode = "hadamard"
            cfg.rotation.r3 = cfg.rotation.r4 = name not in ONLINE_OFF
            cfg.quant = QuantConfig(weight=QuantSpec(w, symmetric=True, clip_search=True),
                                    act=QuantSpec(a, symmetric=False, clip_ratio=0.9),
                                    key=QuantSpec(kv, symmetric=False, clip_ratio=0.95),
                                    value=QuantSpec(kv, symmetric=False, clip_ratio=0.95))
            model = copy.deepcopy(base)
            quantize_model(model, cfg, tokenizer, progress=False)
            save_quantized(model, tokenizer, cfg, out)
        del model
        print(f"prepared {name} in {time.perf_counter() - t:.0f}s → {out}", file=sys.stderr)


def child(name: str, path: Path, prompt_len: int, decode_tokens: int, repeats: int, threads: int,
          weight_only: str, decode_step: bool = True, compile_step: bool = False) -> dict:
    """Runs in its own process: load, prefill, decode; report speeds and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    import spinquant.runtime as rt

    base_rss = peak_rss()
    t = time.perf_counter()
    if name in VARIANTS:
        weight_only = VARIANTS[name][1]
    if CONFIGS.get(name, ()) is None:
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        def new_cache():  # transformers makes its own DynamicCache
            return None
    else:
        model, _ = rt.load_quantized(path, weight_only=weight_only)
        new_cache = model.new_cache
    load_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)

    def run_prefill() -> float:
        t0 = time.perf_counter()
        # Logits of the last position only, as generation (and llama-bench's prompt test) needs.
        model(prompt, cache=new_cache(), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0

    from spinquant.runtime.decode import engine_for

    engine = engine_for(model, compile=compile_step) if decode_step and hasattr(model, "spinquant_kv") else None

    def run_decode() -> float:
        if engine is not None:  # the packed model's own decode step, as `spinquant generate` runs it
            logits = engine.begin(prompt[:, :32], 32 + decode_tokens)
            t0 = time.perf_counter()
            for i in range(decode_tokens):
                logits = engine.forward_token(int(logits.argmax()), 32 + i)
            return time.perf_counter() - t0
        out = model(prompt[:, :32], cache=new_cache(), use_cache=True)
        cache = out.cache
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(tok, cache=cache, use_cache=True)
            cache = out.cache
            tok = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    with torch.inference_mode():
        run_prefill()  # warm-up (allocator, oneDNN primitive caches)
        prefill = statistics.median(run_prefill() for _ in range(repeats))
        run_decode()
        decode = statistics.median(run_decode() for _ in range(repeats))
    peak = peak_rss()
    return {"config": name, "prefill_tok_s": prompt_len / prefill, "decode_tok_s": decode_tokens / decode,
            "peak_rss": peak, "rss_over_imports": peak - base_rss, "load_s": load_s,
            "disk_bytes": dir_size(path), "weights_bytes": weights_size(path)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {', '.join([*CONFIGS, *VARIANTS])}")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "spinquant" / "bench-runtime"),
                   help="where the checkpoints are kept between runs")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length (tokens)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens timed in the decode loop (batch 1)")
    p.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (the CPU may be shared)")
    p.add_argument("--weight-only", choices=("native", "cached", "otf", "int4pack"), default="native",
                   help="kernel of the 4-bit configs: packed codes read by the native kernel (native), int8 "
                        "codes / weights dequantized once at load (cached), on every call (otf), or torch's "
                        "packed int4 CPU kernel in bf16 (int4pack); the *-cached / *-otf / *-int4 rows pick one")
    p.add_argument("--decode", choices=("step", "compiled", "hf"), default="step",
                   help="decode loop of the packed models: their own step (runtime/decode.py, what `spinquant "
                        "generate` runs), the same step under torch.compile, or the transformers forward")
    p.add_argument("--rebuild", action="store_true", help="re-quantize and re-save every checkpoint")
    p.add_argument("--json", help="also write the record (command, commit, machine, rows) to this JSON file")
    p.add_argument("--prepare-only", action="store_true", help="write the checkpoints, measure nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    workdir = Path(a.workdir)

    if a.child:
        row = child(a.child, workdir / checkpoint_of(a.child), a.prompt_len, a.decode_tokens, a.repeats, a.threads,
                    a.weight_only, a.decode != "hf", a.decode == "compiled")
        row["decode_loop"] = a.decode if CONFIGS.get(checkpoint_of(a.child)) is not None else "hf"
        print("RESULT " + json.dumps(row))
        return 0

    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS and n not in VARIANTS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {', '.join([*CONFIGS, *VARIANTS])}")
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(names, workdir, a.model, a.rebuild)
    if a.prepare_only:
        return 0
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--workdir", str(workdir), "--prompt-len",
               str(a.prompt_len), "--decode-tokens", str(a.decode_tokens), "--repeats", str(a.repeats),
               "--threads", str(a.threads), "--weight-only", a.weight_only, "--decode", a.decode]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name}: child failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"measured {name}", file=sys.stderr)
    print_table(rows, a)
    if a.json:
        write_record(Path(a.json), threads=a.threads, prompt_len=a.prompt_len, decode_tokens=a.decode_tokens,
                     repeats=a.repeats, decode=a.decode, weight_only=a.weight_only, rows=rows)
    return 0


def print_table(rows: list[dict], a) -> None:
    from rich.console import Console
    from rich.table import Table

    ref = next((r for r in rows if r["config"] == "fp32"), None)
    fp16_bytes = ref["weights_bytes"] / 2 if ref else None
    table = Table(title=f"{a.model} on CPU ({a.threads} thread(s)): prefill {a.prompt_len} tokens, "
                        f"decode {a.decode_tokens} tokens, batch 1")
    for col in ("config", "prefill tok/s", "vs fp32", "decode tok/s", "vs fp32", "peak RSS MiB",
                "RSS - imports MiB", "weights MiB", "vs fp16", "load s"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        table.add_row(
            r["config"], f"{r['prefill_tok_s']:.0f}",
            f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}×" if ref else "-",
            f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}×" if ref else "-",
            f"{r['peak_rss'] / 2**20:.0f}", f"{r['rss_over_imports'] / 2**20:.0f}",
            f"{r['weights_bytes'] / 2**20:.1f}",
            f"{r['weights_bytes'] / fp16_bytes:.2f}×" if fp16_bytes else "-", f"{r['load_s']:.1f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    sys.exit(main())
