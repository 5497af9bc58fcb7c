"""How many --tune-scales steps pay off: perplexity after every few steps of one tuning run.

    python benchmarks/bench_tune_steps.py --row "--rotation hadamard --a-bits 16 --kv-bits 16 \
        --weight-quant gptq --tune-scales 120" --every 20 --eval wikitext2:16,c4:4 \
        --json benchmarks/results/tune_steps_w4a16.json

The row is `spinquant quantize` flags (its --tune-scales is the longest run). The model is quantized once;
during tuning, every --every steps, the model is evaluated as tuning would leave it at that step, so each
line (0: untuned) is what `--tune-scales <that many>` gives (same data order, same optimizer state), bar the
embedding and lm_head, which stay float until tuning ends: use --tables float16 or float32 for lines comparable with the
final one. Tuning seconds exclude the evaluations.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import torch
from bench_accuracy import describe, eval_texts, perplexities, row_config
from record import write_record  # at the top: the record's load is the one at start
from report import table

from spinquant.loading import load_model
from spinquant.pipeline import quantize_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--row", required=True, metavar="FLAGS", help="the recipe as `spinquant quantize` flags")
    p.add_argument("--every", type=int, default=20, help="evaluate after every this many tuning steps")
    p.add_argument("--eval", default="wikitext2:16", help="texts and window counts, e.g. wikitext2:16,c4:4")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, help="write the record here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    cfg = row_config(a.row, a.model)
    if cfg.tune.steps < a.every:
        raise SystemExit(f"the row's --tune-scales ({cfg.tune.steps}) must be at least --every ({a.every})")
    model, tok = load_model(a.model)
    texts = eval_texts(a.eval, tok, a.seq_len)
    print(describe(a.model, texts, a.seq_len), flush=True)

    m = copy.deepcopy(model)
    rows: list[dict] = []
    eval_s = 0.0

    def checkpoint(steps: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        rows.append({"steps": steps, "ppl": perplexities(m, texts)})
        eval_s += time.perf_counter() - t
        print(rows[-1], flush=True)

    t = time.perf_counter()
    report = quantize_model(m, cfg, tok, progress=False, tune_every=a.every, tune_checkpoint=checkpoint)
    quantize_s = time.perf_counter() - t
    rows.append({"steps": cfg.tune.steps, "final": True,
                 "ppl": perplexities(m, texts)})
    print(rows[-1], flush=True)
    # Every step costs the same: a line's tuning time is its share of the run's (evaluations measured apart).
    tune_s = report.seconds["tune"] - eval_s
    for r in rows:
        r["tune_s"] = round(tune_s * r["steps"] / cfg.tune.steps, 1)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    names = list(texts)
    print(f"\npeak RSS {peak_gb:.1f} GB\n")
    print(table(["tuning steps", *names, "tuning s"],
                [[f"{r['steps']}{' (final)' if r.get('final') else ''}", *(f"{r['ppl'][k]:.2f}" for k in names),
                  f"{r['tune_s']:.0f}"] for r in rows]))
    if a.json:
        write_record(a.json, model=a.model, threads=torch.get_num_threads(), seq_len=a.seq_len, flags=a.row,
                     every=a.every, eval_windows={k: len(v) for k, v in texts.items()},
                     peak_rss_gb=round(peak_gb, 2), quantize_s=round(quantize_s, 1),
                     stages_s={k: round(v, 1) for k, v in report.seconds.items()}, checkpoint_eval_s=round(eval_s, 1),
                     losses=report.tune_losses, rows=rows)


if __name__ == "__main__":
    main()
