"""Python API: load, quantize, evaluate, compare. The CLI calls these and nothing else."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from .config import QuantConfig, QuantSpec, RunConfig
from .data import load_text, tokenize_windows
from .errors import SpinQuantError
from .evaluate import perplexity
from .loading import load_model
from .pipeline import quantize_model

console = Console(stderr=False, highlight=False)


def check_seq_len(model, seq_len: int, flag: str = "--seq-len") -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SpinQuantError(f"{flag} {seq_len} exceeds the model's context of {limit} tokens; use {flag} {limit} "
                             "or less")


def eval_windows(cfg: RunConfig, model, tokenizer) -> torch.Tensor:
    check_seq_len(model, cfg.eval.seq_len)
    return tokenize_windows(load_text(cfg.eval.data), tokenizer, cfg.eval.seq_len, cfg.eval.max_windows)


def quantize(model, tokenizer, cfg: RunConfig, progress: bool = True):
    """Rotate and quantize an already-loaded model in place; returns the run report."""
    return quantize_model(model, cfg, tokenizer, progress=progress)


def run_eval(cfg: RunConfig) -> dict:
    model, tokenizer = load_model(cfg.model)
    windows = eval_windows(cfg, model, tokenizer)
    t = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=cfg.eval.batch_size)
    console.print(f"{cfg.model}  FP  {cfg.eval.data} ppl = [bold]{ppl:.2f}[/] ({len(windows)}×{cfg.eval.seq_len} tokens)")
    return {"model": cfg.model, "method": "fp", "ppl": ppl, "windows": len(windows),
            "seq_len": cfg.eval.seq_len, "eval_seconds": time.perf_counter() - t}


def run_quantize(cfg: RunConfig, evaluate: bool = True) -> dict:
    if cfg.output:
        from .io import check_writable
        from pathlib import Path

        check_writable(Path(cfg.output), cfg.overwrite)  # fail before an hour of work, not after
    model, tokenizer = load_model(cfg.model)
    windows = eval_windows(cfg, model, tokenizer) if evaluate else None
    report = quantize(model, tokenizer, cfg)
    result = {"model": cfg.model, "method": cfg.rotation.mode, "quant": cfg.quant.label,
              "weight_method": cfg.quant.weight_method, "seconds": report.seconds}
    if report.train:
        result["train"] = report.train
    if windows is not None:
        result["ppl"] = perplexity(model, windows, batch_size=cfg.eval.batch_size)
        console.print(f"{cfg.model}  {cfg.quant.label} {cfg.quant.weight_method.upper()} rotation={cfg.rotation.mode}"
                      f"  {cfg.eval.data} ppl = [bold]{result['ppl']:.2f}[/]")
    if cfg.output:
        from .runtime.checkpoint import save_quantized

        save_quantized(model, tokenizer, cfg, cfg.output, overwrite=cfg.overwrite)
        result["output"] = cfg.output
        console.print(f"saved to {cfg.output}")
    return result


def method_config(cfg: RunConfig, method: str) -> RunConfig:
    """The RunConfig for one row of a comparison."""
    if method == "fp":
        off = QuantSpec(bits=16)
        return replace(cfg, quant=QuantConfig(weight=off, act=off, key=off, value=off),
                       rotation=replace(cfg.rotation, mode="none", save_file=None))
    if method == "rtn":
        return replace(cfg, rotation=replace(cfg.rotation, mode="none", save_file=None))
    if method in ("hadamard", "random", "learned"):
        return replace(cfg, rotation=replace(cfg.rotation, mode=method,
                                             save_file=cfg.rotation.save_file if method == "learned" else None))
    raise SpinQuantError(f"unknown method {method!r}; use fp, rtn, hadamard, random or learned")


def run_compare(cfg: RunConfig, methods: list[str], markdown: str | None = None) -> dict:
    base, tokenizer = load_model(cfg.model)
    windows = eval_windows(cfg, base, tokenizer)
    rows = []
    for method in methods:
        mcfg = method_config(cfg, method)
        model = copy.deepcopy(base)
        t = time.perf_counter()
        if method != "fp":
            quantize(model, tokenizer, mcfg)
        seconds = time.perf_counter() - t
        ppl = perplexity(model, windows, batch_size=cfg.eval.batch_size)
        rows.append({"method": method, "quant": "FP" if method == "fp" else mcfg.quant.label,
                     "weights": "-" if method == "fp" else mcfg.quant.weight_method,
                     "ppl": ppl, "quantize_seconds": seconds})
        del model
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    table = Table(title=f"{cfg.model} — {cfg.eval.data}, {len(windows)}×{cfg.eval.seq_len} tokens")
    for col in ("method", "bits", "weights", "perplexity", "vs FP", "quantize s"):
        table.add_column(col, justify="left" if col in ("method", "bits", "weights") else "right")
    for r in rows:
        rel = f"{r['ppl'] / fp:.2f}×" if fp else "-"
        table.add_row(r["method"], r["quant"], r["weights"], f"{r['ppl']:.2f}", rel, f"{r['quantize_seconds']:.0f}")
    console.print(table)
    if markdown:
        from pathlib import Path

        from .io import atomic_path

        lines = ["| method | bits | weights | perplexity | vs FP |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['quant']} | {r['weights']} | {r['ppl']:.2f} | "
                  f"{(r['ppl'] / fp) if fp else float('nan'):.2f}× |" for r in rows]
        with atomic_path(Path(markdown), overwrite=cfg.overwrite) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    return {"model": cfg.model, "eval_data": cfg.eval.data, "rows": rows}
