"""Python API: load, quantize, evaluate, compare. The CLI calls these and nothing else."""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from . import distributed
from .config import QuantConfig, QuantSpec, RotationMode, RunConfig
from .errors import SpinQuantError
from .evaluation.data import load_text, tokenize_windows
from .evaluation.scoring import perplexity
from .loading import load_model
from .models import model_parts
from .pipeline import quantize_model
from .streaming import LayerStream, resolve_device

console = Console(stderr=False, highlight=False)


def check_seq_len(model, seq_len: int, flag: str = "--seq-len") -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SpinQuantError(f"{flag} {seq_len} exceeds the model's context of {limit} tokens; use {flag} {limit} "
                             "or less")


def check_new_tokens(model, n: int, flag: str) -> None:
    """Tokens to generate after at least one prompt token must fit the context (or generation never ends)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n >= limit:
        raise SpinQuantError(f"{flag} {n} exceeds the model's context of {limit} tokens (prompt included); use "
                             f"{flag} {limit - 1} or less")


def check_calibration_seq_len(model, cfg: RunConfig, methods: tuple[str, ...] = ()) -> None:
    """Training and GPTQ windows must fit the model's context too; checked before any work."""
    learned = cfg.rotation.mode == RotationMode.LEARNED or RotationMode.LEARNED in methods
    if learned and not cfg.rotation.rotation_file:
        check_seq_len(model, cfg.train.seq_len, "--train-seq-len")
    if cfg.quant.weight_method == "gptq":
        check_seq_len(model, cfg.gptq.seq_len, "--gptq-seq-len")


def eval_windows(cfg: RunConfig, model, tokenizer) -> torch.Tensor:
    check_seq_len(model, cfg.eval.seq_len)
    return tokenize_windows(load_text(cfg.eval.data), tokenizer, cfg.eval.seq_len, cfg.eval.max_windows)


def model_device(cfg: RunConfig) -> str:
    """Where the model is loaded: CPU memory with --offload (layers then visit the device), else the device."""
    return "cpu" if cfg.offload else str(resolve_device(cfg.device))


@contextmanager
def evaluating(model, cfg: RunConfig):
    """Yields the device evaluation runs on; with --offload, decoder layers visit it one at a time."""
    if not cfg.offload:
        yield None
        return
    stream = LayerStream(resolve_device(cfg.device))
    with stream.forward(model_parts(model)):
        yield stream.device


def quantize(model, tokenizer, cfg: RunConfig, progress: bool = True):
    """Rotate and quantize an already-loaded model in place; returns the run report."""
    return quantize_model(model, cfg, tokenizer, progress=progress)


def evaluate(model, tokenizer, data: str = "wikitext2", max_windows: int | None = 16, seq_len: int = 2048,
             progress: bool = True) -> float:
    """Perplexity of `model` on the first `max_windows` windows of `seq_len` tokens of `data` (wikitext2 test
    split, c4, or a text / JSONL file): the figure `spinquant quantize` and `eval` report."""
    cfg = RunConfig()
    cfg.eval = replace(cfg.eval, data=data, max_windows=max_windows, seq_len=seq_len)
    cfg.eval.validate()
    return perplexity(model, eval_windows(cfg, model, tokenizer), progress=progress)


def save(model, tokenizer, path, cfg: RunConfig | None = None, overwrite: bool = False):
    """Write a model quantized by `quantize` as a packed folder (4-bit codes, scales, tokenizer) that
    `spinquant.load` and every CLI command read; an existing folder is kept unless overwrite=True."""
    from .runtime.checkpoint import save_quantized

    return save_quantized(model, tokenizer, cfg, path, overwrite=overwrite)


def run_eval(cfg: RunConfig) -> dict:
    model, tokenizer = load_model(cfg.model, device=model_device(cfg), verify=cfg.verify)
    windows = eval_windows(cfg, model, tokenizer)
    t = time.perf_counter()
    with evaluating(model, cfg) as device:
        ppl = perplexity(model, windows, batch_size=cfg.eval.batch_size, device=device)
    packed = getattr(model, "spinquant_config", None)  # a checkpoint saved with quantize --output
    method = packed["quantization"]["label"] if packed else "fp"
    console.print(f"{cfg.model}  {method.upper()}  {cfg.eval.data} ppl = [bold]{ppl:.2f}[/] "
                  f"({len(windows)}×{cfg.eval.seq_len} tokens)")
    result = {"model": cfg.model, "method": method, "ppl": ppl, "windows": len(windows),
              "seq_len": cfg.eval.seq_len, "eval_seconds": time.perf_counter() - t}
    with evaluating(model, cfg):
        return add_task_results(result, cfg, model, tokenizer, label=method.upper())


def run_tasks(cfg: RunConfig, model, tokenizer, progress: bool = True) -> dict | None:
    """Zero-shot accuracy on cfg.eval.tasks ({task: {acc, acc_norm, n}}), or None when no task was asked."""
    if not cfg.eval.tasks:
        return None
    from .evaluation.lm_eval_bridge import evaluate_tasks

    return evaluate_tasks(model, tokenizer, cfg.eval.tasks, limit=cfg.eval.task_limit, progress=progress)


def print_tasks(results: dict, label: str = "") -> None:
    from .evaluation.lm_eval_bridge import average_accuracy, main_metric

    table = Table(title=f"zero-shot accuracy {label}".strip())
    for col in ("task", "acc", "acc_norm", "n"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, r in results.items():
        cells = [f"{100 * r[k]:.1f}" + ("*" if main_metric(task) == k else "") for k in ("acc", "acc_norm")]
        table.add_row(task, *cells, str(r.get("n", "-")))
    avg = average_accuracy(results)
    if avg is not None and len(results) > 1:
        table.add_row("avg (*)", f"{100 * avg:.1f}", "", "")
    console.print(table)


def add_task_results(result: dict, cfg: RunConfig, model, tokenizer, label: str = "") -> dict:
    """Run the requested zero-shot tasks, print them, and put them under result["tasks"]."""
    tasks = run_tasks(cfg, model, tokenizer)
    if tasks is not None:
        print_tasks(tasks, label)
        result["tasks"] = tasks
    return result


def run_quantize(cfg: RunConfig, evaluate: bool = True, export=None) -> dict:
    """export: a spinquant.export.ExportRequest, written from the quantized model in memory."""
    if cfg.output:
        from pathlib import Path

        from .io import check_writable

        check_writable(Path(cfg.output), cfg.overwrite, directory=True)  # fail before an hour of work
    if export is not None:
        from .export import check_request

        check_request(export, cfg)  # an export that cannot work fails now, before the quantization
    model, tokenizer = load_model(cfg.model, device=model_device(cfg), float_only=True)
    check_calibration_seq_len(model, cfg)
    windows = eval_windows(cfg, model, tokenizer) if evaluate else None
    report = quantize(model, tokenizer, cfg, progress=distributed.is_main())
    result = {"model": cfg.model, "method": cfg.rotation.mode, "quant": cfg.quant.label,
              "weight_method": cfg.quant.weight_method, "seconds": report.seconds}
    if not distributed.is_main():  # torchrun: rank 0 alone evaluates, prints and writes
        return result
    if report.train:
        result["train"] = report.train
    if windows is not None:
        # On the CPU the packed runtime model is what gets evaluated: the modules a saved copy runs.
        runner = runtime_model(model, cfg)[0] if model_device(cfg) == "cpu" else model
        with evaluating(runner, cfg) as device:
            result["ppl"] = perplexity(runner, windows, batch_size=cfg.eval.batch_size, device=device)
        del runner
        console.print(f"{cfg.model}  {cfg.quant.label} {cfg.quant.weight_method.upper()} rotation={cfg.rotation.mode}"
                      f"  {cfg.eval.data} ppl = [bold]{result['ppl']:.2f}[/]")
    if cfg.output:
        from .runtime.checkpoint import save_quantized

        save_quantized(model, tokenizer, cfg, cfg.output, overwrite=cfg.overwrite)
        result["output"] = cfg.output
        console.print(f"saved to {cfg.output}")
    if export is not None:
        from .export import run_export

        result["export"] = {"format": export.format, "output": str(run_export(model, tokenizer, export))}
        console.print(f"exported {export.format} to {export.output}")
    with evaluating(model, cfg):
        return add_task_results(result, cfg, model, tokenizer, label=cfg.quant.label)


def method_config(cfg: RunConfig, method: str) -> RunConfig:
    """The RunConfig for one row of a comparison."""
    if method == "fp":
        off = QuantSpec(bits=16)
        return replace(cfg, quant=QuantConfig(weight=off, act=off, key=off, value=off),
                       rotation=replace(cfg.rotation, mode=RotationMode.NONE, save_file=None, rotation_file=None))
    if method == "rtn":
        return replace(cfg, rotation=replace(cfg.rotation, mode=RotationMode.NONE, save_file=None, rotation_file=None))
    if method in (RotationMode.HADAMARD, RotationMode.RANDOM):
        return replace(cfg, rotation=replace(cfg.rotation, mode=method, save_file=None, rotation_file=None))
    if method == RotationMode.LEARNED:
        return replace(cfg, rotation=replace(cfg.rotation, mode=method))
    raise SpinQuantError(f"unknown method {method!r}; use fp, rtn, hadamard, random or learned")


def run_compare(cfg: RunConfig, methods: list[str], markdown: str | None = None, plot: str | None = None,
                cost: dict | None = None) -> dict:
    """plot: also write a PNG chart there, and the Markdown table beside it (same name, .md) unless `markdown`.

    cost: measure each row's inference cost (runtime/cost.py) with these keyword arguments of `cost.measure`
    (prompt_len, decode_tokens, threads), or {} for its defaults; None skips it. Quantized rows are evaluated
    and timed as their packed runtime model (what a saved copy runs), the FP row as the float model."""
    from pathlib import Path

    from .io import check_writable

    if plot and Path(plot).suffix.lower() != ".png":
        raise SpinQuantError(f"--plot writes a PNG file; give it a name ending in .png, not {Path(plot).name!r}")
    if plot and not markdown:
        markdown = str(Path(plot).with_suffix(".md"))
    for out in (markdown, plot):
        if out:
            check_writable(Path(out), cfg.overwrite)  # before the comparison runs, not after
    base, tokenizer = load_model(cfg.model, device=model_device(cfg), float_only=True)
    check_calibration_seq_len(base, cfg, tuple(methods))
    if cost:  # the timed prompt and decode must fit the context (a huge --cost-decode would never end)
        check_new_tokens(base, cost.get("decode_tokens", 32), "--cost-decode")
    windows = eval_windows(cfg, base, tokenizer)
    rows = []
    for method in methods:
        mcfg = method_config(cfg, method)
        model = copy.deepcopy(base)
        t = time.perf_counter()
        size = None
        if method != "fp":
            quantize(model, tokenizer, mcfg)
            model, size = runtime_model(model, mcfg)
        seconds = time.perf_counter() - t
        with evaluating(model, cfg) as device:
            ppl = perplexity(model, windows, batch_size=cfg.eval.batch_size, device=device)
        rows.append({"method": method, "quant": "FP" if method == "fp" else mcfg.quant.label,
                     "weights": "-" if method == "fp" else mcfg.quant.weight_method,
                     "ppl": ppl, "quantize_seconds": seconds})
        with evaluating(model, cfg):
            tasks = run_tasks(cfg, model, tokenizer)
        if tasks is not None:
            rows[-1]["tasks"] = tasks
        if cost is not None and not cfg.offload:
            from .runtime.cost import float_checkpoint_bytes, measure

            size = size if size is not None else float_checkpoint_bytes(model)
            rows[-1]["cost"] = measure(model, size, **cost).to_dict()
        del model
    from .evaluation.plot import (
        accuracy_cells,
        accuracy_headers,
        cost_cells,
        cost_headers,
        plot_comparison,
        task_names,
        write_markdown,
    )

    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    title = f"{cfg.model} — {cfg.eval.data}, {len(windows)}×{cfg.eval.seq_len} tokens"
    if cfg.eval.tasks:
        title += f"; zero-shot {'first ' + str(cfg.eval.task_limit) if cfg.eval.task_limit else 'all'} items"
    names = task_names(rows)
    table = Table(title=title)
    for col in ("method", "bits", "weights", "perplexity", "vs FP", "quantize s", *accuracy_headers(names)):
        table.add_column(col, justify="left" if col in ("method", "bits", "weights") else "right")
    for r in rows:
        rel = f"{r['ppl'] / fp:.2f}×" if fp else "-"
        table.add_row(r["method"], r["quant"], r["weights"], f"{r['ppl']:.2f}", rel, f"{r['quantize_seconds']:.0f}",
                      *accuracy_cells(r, names))
    console.print(table)
    if any("cost" in r for r in rows):  # a second table, so each fits a terminal
        c = next(r["cost"] for r in rows if "cost" in r)
        speed = f"{c['threads']} thread(s), prompt {c['prompt_len']}, decode {c['decode_tokens']}, batch 1"
        title += f"; speed: {speed}"
        table = Table(title=f"inference cost ({speed})")
        for col in ("method", "bits", "perplexity", *cost_headers()):
            table.add_column(col, justify="left" if col in ("method", "bits") else "right")
        for r in rows:
            table.add_row(r["method"], r["quant"], f"{r['ppl']:.2f}", *cost_cells(r))
        console.print(table)
    result = {"model": cfg.model, "eval_data": cfg.eval.data, "rows": rows}
    if markdown:
        result["markdown"] = str(write_markdown(rows, markdown, title, overwrite=cfg.overwrite))
    if plot:
        result["plot"] = str(plot_comparison(rows, plot, title, overwrite=cfg.overwrite))
        console.print(f"wrote {result['plot']} and {result['markdown']}")
    return result


def runtime_model(model, cfg: RunConfig):
    """(the packed runtime model, checkpoint bytes) of a quantized model, or (model, None) where it stays in
    fake quantization (--offload: layers stream to the device; the runtime model runs on the CPU only; per-layer
    or per-role weight bits, which the packed format cannot hold: the same function, computed in float)."""
    if cfg.offload or cfg.quant.weight_role_bits:
        return model, None
    from .runtime.checkpoint import freeze

    return freeze(model, cfg)


def run_export(source: str, request, verify: bool = True) -> dict:
    """Export a folder saved by `quantize --output` (request: a spinquant.export.ExportRequest)."""
    from .export import check_request
    from .export import run_export as write_export

    check_request(request)
    t = time.perf_counter()
    out = write_export(source, None, request, verify=verify)
    console.print(f"exported {source} as {request.format} to {out}")
    return {"source": source, "format": request.format, "output": str(out), "seconds": time.perf_counter() - t}


def run_generate(model_name: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0, stream: bool = True, verify: bool = True) -> dict:
    """Generate from a packed checkpoint folder (or any model load_model takes); streams to stdout."""
    import sys

    from .runtime.generate import generate_text

    if not prompt.strip():
        raise SpinQuantError("the prompt is empty; give some text to continue")
    torch.manual_seed(seed)
    model, tokenizer = load_model(model_name, verify=verify)
    check_new_tokens(model, max_new_tokens, "--max-new-tokens")
    if stream:  # the prompt, then the continuation as it comes
        sys.stdout.write(prompt)
        sys.stdout.flush()
    result = generate_text(model, tokenizer, prompt, max_new_tokens, temperature, out=sys.stdout if stream else None)
    if stream:
        rate = f", {result['tokens_per_s']:.1f} tokens/s" if result["tokens_per_s"] else ""
        print(f"[{result['new_tokens']} new tokens in {result['seconds']:.2f} s{rate}]", file=sys.stderr)
    return {"model": model_name, **result}


def run_chat(model_name: str, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
             verify: bool = True) -> dict:
    """Interactive chat on stdin/stdout (chat template when the tokenizer has one); EOF or 'exit' ends it."""
    from .runtime.generate import chat_loop

    torch.manual_seed(seed)
    model, tokenizer = load_model(model_name, verify=verify)
    return {"model": model_name, **chat_loop(model, tokenizer, max_new_tokens, temperature)}
