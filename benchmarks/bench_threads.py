"""How the weight step's kernels scale with intra-op threads (issue 19): seconds per call at 1..N threads.

Each kernel runs on a real shape of SmolLM2-135M (down_proj: 576 x 1536, and gate/up: 1536 x 576) with random
weights (timings do not depend on the values): the native RTN clip search, the tensor-op clip search GPTQ's
weighted search uses, GPTQ on one linear, and a decoder-layer-sized matmul (evaluation and Hessian capture).
`--busy` starts a process that keeps one core busy, as when something else runs beside a quantization.

    python benchmarks/bench_threads.py --json benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch
from record import write_record

from spinquant.config import QuantSpec
from spinquant.quant.gptq import gptq_quantize
from spinquant.quant.quantizer import search_clip_ratio


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (native build, allocator)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def kernels() -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=g) * 0.02
    x = torch.randn(2048, 576, generator=g)
    h = x.T @ x / len(x)
    group32 = QuantSpec(bits=4, symmetric=True, group_size=32, clip_search=True, full_range=True)
    rows32 = w.reshape(-1, 32)
    imp = torch.diagonal(h).reshape(-1, 32).repeat(1536, 1)[: len(rows32)]
    return {
        "clip search, native (RTN 1536x576 per channel)": lambda: search_clip_ratio(w, 4, True),
        "clip search, weighted tensor ops (1536x576, groups of 32)": lambda: search_clip_ratio(
            rows32, 4, True, full_range=True, importance=imp),
        "GPTQ one linear (1536x576, groups of 32, weighted)": lambda: gptq_quantize(w, h, group32,
                                                                                    weighted_clip=True),
        "matmul 2048x576 @ 576x1536 (a layer's forward)": lambda: x @ w.T,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma list of intra-op thread counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    p.add_argument("--json", type=Path, help="write the record here")
    args = p.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    stop = mp.Event()
    hog = mp.Process(target=_spin, args=(stop,), daemon=True) if args.busy else None
    if hog:
        hog.start()
    rows = []
    try:
        for name, fn in kernels().items():
            row = {"kernel": name}
            for n in counts:
                torch.set_num_threads(n)
                row[f"s_{n}_threads"] = timed(fn, args.repeats)
            rows.append(row)
    finally:
        if hog:
            stop.set()
            hog.join()
    print(f"{'kernel':58s}" + "".join(f"{f'{n} thr (s)':>12s}" for n in counts) + f"{'1/N':>8s}")
    for row in rows:
        times = [row[f"s_{n}_threads"] for n in counts]
        print(f"{row['kernel']:58s}" + "".join(f"{t:12.3f}" for t in times) + f"{times[0] / times[-1]:8.2f}")
    if args.json:
        write_record(args.json, busy_core=args.busy, repeats=args.repeats, rows=rows)


if __name__ == "__main__":
    main()
