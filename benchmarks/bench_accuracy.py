"""Perplexity of quantization recipes, each row given as `spinquant quantize` flags, on several texts.

    python benchmarks/bench_accuracy.py --fp --row "--rotation none" --row "--rotation hadamard"
    python benchmarks/bench_accuracy.py --row "--rotation hadamard --a-bits 16 --kv-bits 16 --weight-quant gptq" \
        --eval wikitext2:16,c4:4 --json benchmarks/results/accuracy_gptq.json

A row's flags go through the CLI's own parser (`cli.config_from_args`), so a row is exactly what
`spinquant quantize <flags>` runs and the record keeps those flags. The model loads once; each row quantizes
a fresh copy. Rows print as they finish; --json writes the record RESULTS.md is generated from. --tasks
adds zero-shot accuracy of each row's model (first --task-limit items, with binomial standard errors).
"""

from __future__ import annotations

import argparse
import copy
import resource
import shlex
import time
from pathlib import Path

import torch
from record import write_record  # at the top: the record's load is the one at start
from report import table

from spinquant.cli import config_from_args, parse_args
from spinquant.evaluation.data import load_text, tokenize_windows
from spinquant.evaluation.lm_eval_bridge import add_standard_errors, check_tasks, evaluate_tasks, parse_tasks
from spinquant.evaluation.scoring import perplexity
from spinquant.loading import load_model
from spinquant.pipeline import quantize_model


def row_config(flags: str, model: str):
    return config_from_args(parse_args(["quantize", "--model", model, *shlex.split(flags)]))


def parse_eval(spec: str) -> dict[str, int]:
    """'wikitext2:16,c4:4' → {text: windows}."""
    out = {}
    for item in spec.split(","):
        name, _, n = item.partition(":")
        out[name] = int(n or 16)
    return out


def eval_texts(spec: str, tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """'wikitext2:16,c4:4' → {text: its first windows of seq_len tokens}."""
    return {name: tokenize_windows(load_text(name), tokenizer, seq_len, n) for name, n in parse_eval(spec).items()}


def perplexities(model, texts: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: perplexity(model, windows, progress=False) for name, windows in texts.items()}


def describe(model_name: str, texts: dict[str, torch.Tensor], seq_len: int) -> str:
    return (f"# {model_name}, {', '.join(f'{k} {len(v)}×{seq_len}' for k, v in texts.items())}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--row", action="append", default=[], metavar="FLAGS",
                   help="one recipe as `spinquant quantize` flags (repeat for more rows)")
    p.add_argument("--fp", action="store_true", help="add the unquantized row")
    p.add_argument("--eval", default="wikitext2:16", help="texts and window counts, e.g. wikitext2:16,c4:4")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tasks", default="", help="also zero-shot tasks per row, e.g. piqa,arc_easy,hellaswag")
    p.add_argument("--task-limit", type=int, default=500, help="first N items of each task (0 = all)")
    p.add_argument("--json", type=Path, help="write the record here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    rows_cfg = [(flags, row_config(flags, a.model)) for flags in a.row]  # bad flags fail before the model loads
    model, tok = load_model(a.model)
    texts = eval_texts(a.eval, tok, a.seq_len)
    print(describe(a.model, texts, a.seq_len), flush=True)

    tasks = check_tasks(parse_tasks(a.tasks)) if a.tasks else ()

    def zero_shot(m) -> dict:
        """{"tasks": {task: {metrics, "n", "stderr"}}, "eval_tasks_s"} of the row's model (none asked: {})."""
        if not tasks:
            return {}
        t = time.perf_counter()
        res = add_standard_errors(evaluate_tasks(m, tok, list(tasks), limit=a.task_limit or None, progress=False))
        return {"tasks": res, "eval_tasks_s": round(time.perf_counter() - t, 1)}

    rows = []
    if a.fp:
        rows.append({"flags": None, "label": "FP", "rotation": "-", "weights": "-",
                     "ppl": perplexities(model, texts), **zero_shot(model)})
        print(rows[-1], flush=True)
    for flags, cfg in rows_cfg:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        report = quantize_model(m, cfg, tok, progress=False)
        seconds = time.perf_counter() - t
        rows.append({"flags": flags, "label": cfg.quant.label, "rotation": cfg.rotation.mode.value,
                     "weights": cfg.quant.weight_method, "w_group": cfg.quant.weight.group_size,
                     "tables": cfg.tables, "quantize_s": round(seconds, 1),
                     "weights_s": round(report.seconds.get("weights", 0.0), 1),
                     "stages_s": {k: round(v, 1) for k, v in report.seconds.items()},
                     "ppl": perplexities(m, texts), **zero_shot(m)})
        print(rows[-1], flush=True)
        del m
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    names = list(texts)
    print(f"\npeak RSS {peak_gb:.1f} GB\n")
    print(table(["flags", "bits", *names, "quantize s"],
                [[r["flags"] or "FP", r["label"], *(f"{r['ppl'][k]:.2f}" for k in names),
                  f"{r.get('quantize_s', 0):.0f}"] for r in rows]))
    if a.json:
        write_record(a.json, model=a.model, threads=torch.get_num_threads(), seq_len=a.seq_len,
                     eval_windows={k: len(v) for k, v in texts.items()}, peak_rss_gb=round(peak_gb, 2), rows=rows,
                     **({"task_limit": a.task_limit or None} if tasks else {}))


if __name__ == "__main__":
    main()
