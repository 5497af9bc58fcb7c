"""Zero-shot accuracy of FP / RTN / Hadamard / learned rotations at one bit width, as one Markdown table.

    python benchmarks/bench_zero_shot.py                                  # FP, RTN, Hadamard at W4A4KV4
    python benchmarks/bench_zero_shot.py --rotation-file rot.safetensors  # adds the learned row
    python benchmarks/bench_zero_shot.py --tasks piqa,arc_easy,hellaswag,boolq --limit 200   # boolq: lm-eval

piqa, arc_easy and hellaswag run offline from ../shared/data; other lm-eval task names need
`pip install 'spinquant[lm-eval]'` and network access. Each task is scored on its first --limit items (the
same items for every method, so rows compare). The model loads once; each row quantizes a fresh copy and
prints as it finishes; the table at the end (accuracy in %, the task's main metric) goes into RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import re
import time
from dataclasses import replace

import torch

from spinquant.api import method_config
from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.evaluation.lm_eval_bridge import (
    average_accuracy,
    check_tasks,
    evaluate_tasks,
    main_metric,
    parse_tasks,
)
from spinquant.loading import load_model
from spinquant.pipeline import quantize_model


def parse_bits(label: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"W(\d+)A(\d+)KV(\d+)", label)
    if not m:
        raise SystemExit(f"bad bit label {label!r}; use e.g. W4A4KV4")
    return tuple(int(x) for x in m.groups())


def table(rows: list[dict], tasks: list[str]) -> str:
    head = ["method", "bits", *[f"{t} {main_metric(t)}" for t in tasks], "avg", "quantize s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["tasks"]
        cells = [f"{100 * res[t][main_metric(t)]:.1f}" for t in tasks]
        avg = average_accuracy(res)
        lines.append("| " + " | ".join([r["method"], r["bits"], *cells, f"{100 * avg:.1f}",
                                        f"{r['quantize_s']:.0f}", f"{r['eval_s']:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", default="W4A4KV4")
    p.add_argument("--methods", default="fp,rtn,hadamard,learned",
                   help="fp, rtn (no rotation), hadamard, random, learned (learned needs --rotation-file)")
    p.add_argument("--rotation-file", help="learned R1/R2 (from --save-rotation) for the learned row")
    p.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    p.add_argument("--limit", type=int, default=500, help="first N items of each task (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--weights", default="rtn", choices=("rtn", "gptq"))
    p.add_argument("--calib-data", default="wikitext2-valid", help="calibration text (GPTQ)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tasks = list(check_tasks(parse_tasks(a.tasks)))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if "learned" in methods and not a.rotation_file:
        print("# no --rotation-file: skipping the learned row (train one with "
              "spinquant quantize --rotation learned --save-rotation FILE)", flush=True)
        methods.remove("learned")
    w, act, kv = parse_bits(a.bits)
    limit = a.limit or None

    base = RunConfig(model=a.model)
    base.train.calib_data = base.gptq.calib_data = a.calib_data
    base.quant = QuantConfig(weight=QuantSpec(w, symmetric=True, clip_search=True),
                             act=QuantSpec(act, symmetric=False, clip_ratio=0.9),
                             key=QuantSpec(kv, symmetric=False, clip_ratio=0.95),
                             value=QuantSpec(kv, symmetric=False, clip_ratio=0.95), weight_method=a.weights)
    model, tok = load_model(a.model)
    print(f"# {a.model}, zero-shot {','.join(tasks)}, first {limit or 'all'} items each, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for method in methods:
        cfg = method_config(base, method)
        if method == "learned":  # only the learned row may carry the file (config validation insists)
            cfg.rotation = replace(cfg.rotation, rotation_file=a.rotation_file)
        m = copy.deepcopy(model) if method != "fp" else model
        t = time.perf_counter()
        if method != "fp":
            quantize_model(m, cfg, tok, progress=False)
        quantize_s = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate_tasks(m, tok, tasks, limit=limit, batch_size=a.batch_size, progress=False)
        rows.append({"method": method, "bits": "FP" if method == "fp" else cfg.quant.label, "tasks": res,
                     "quantize_s": quantize_s, "eval_s": time.perf_counter() - t})
        print({k: v for k, v in rows[-1].items()}, flush=True)
        if m is not model:
            del m
    print()
    print(table(rows, tasks))


if __name__ == "__main__":
    main()
