"""Zero-shot accuracy of quantization recipes, each row given as `spinquant quantize` flags, as one table.

    python benchmarks/bench_zero_shot.py --fp --row "--rotation none" --row "--rotation hadamard"
    python benchmarks/bench_zero_shot.py --row "--rotation learned --rotation-file rot.safetensors" --limit 500
    python benchmarks/bench_zero_shot.py --fp --tasks piqa,arc_easy,hellaswag,boolq --limit 200   # boolq: lm-eval

piqa, arc_easy and hellaswag run offline from ../shared/data; other lm-eval task names need
`pip install 'spinquant[lm-eval]'` and network access. Each task is scored on its first --limit items (the
same items for every row, so rows compare); the standard error is sqrt(p(1-p)/n). A row's flags go through
the CLI's parser, as in bench_accuracy.py. --json writes the record RESULTS.md is generated from.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from bench_accuracy import row_config
from record import write_record  # at the top: the record's load is the one at start

from spinquant.evaluation.lm_eval_bridge import (
    add_standard_errors,
    average_accuracy,
    check_tasks,
    evaluate_tasks,
    main_metric,
    parse_tasks,
)
from spinquant.loading import load_model
from spinquant.pipeline import quantize_model


def table(rows: list[dict], tasks: list[str]) -> str:
    head = ["flags", "bits", *[f"{t} {main_metric(t)}" for t in tasks], "avg", "quantize s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["tasks"]
        cells = [f"{100 * res[t][main_metric(t)]:.1f} ± {100 * res[t]['stderr']:.1f}" for t in tasks]
        lines.append("| " + " | ".join([r["flags"] or "FP", r["label"], *cells, f"{100 * r['avg']:.1f}",
                                        f"{r['quantize_s']:.0f}", f"{r['eval_s']:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--row", action="append", default=[], metavar="FLAGS",
                   help="one recipe as `spinquant quantize` flags (repeat for more rows)")
    p.add_argument("--fp", action="store_true", help="add the unquantized row")
    p.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    p.add_argument("--limit", type=int, default=500, help="first N items of each task (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, help="write the record here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tasks = list(check_tasks(parse_tasks(a.tasks)))
    limit = a.limit or None
    rows_cfg = [(None, None)] * a.fp + [(flags, row_config(flags, a.model)) for flags in a.row]

    model, tok = load_model(a.model)
    print(f"# {a.model}, zero-shot {','.join(tasks)}, first {limit or 'all'} items each, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = []
    for flags, cfg in rows_cfg:
        m = model if cfg is None else copy.deepcopy(model)
        t = time.perf_counter()
        if cfg is not None:
            quantize_model(m, cfg, tok, progress=False)
        quantize_s = time.perf_counter() - t
        t = time.perf_counter()
        res = add_standard_errors(evaluate_tasks(m, tok, tasks, limit=limit, batch_size=a.batch_size,
                                                 progress=False))
        rows.append({"flags": flags, "label": "FP" if cfg is None else cfg.quant.label, "tasks": res,
                     "avg": average_accuracy(res), "quantize_s": round(quantize_s, 1),
                     "eval_s": round(time.perf_counter() - t, 1)})
        print(rows[-1], flush=True)
        if m is not model:
            del m
    print()
    print(table(rows, tasks))
    if a.json:
        write_record(a.json, model=a.model, threads=torch.get_num_threads(), limit=limit, rows=rows)


if __name__ == "__main__":
    main()
