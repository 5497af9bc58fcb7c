"""Perplexity of a model under several bit widths × rotations × weight quantizers, as one Markdown table.

    python benchmarks/bench_accuracy.py --bits W4A4KV4,W4A8KV8,W4A16KV16 --rotations none,hadamard
    python benchmarks/bench_accuracy.py --bits W4A16KV16 --rotations none,hadamard --weights rtn,gptq

Loads the model once; each row quantizes a fresh copy. Rows print as they finish, so a long run shows
progress; the table at the end is what goes into RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import re
import resource
import time

import torch

from spinquant.api import eval_windows, method_config
from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.evaluation.scoring import perplexity
from spinquant.loading import load_model
from spinquant.pipeline import quantize_model


def parse_bits(label: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"W(\d+)A(\d+)KV(\d+)", label)
    if not m:
        raise SystemExit(f"bad bit label {label!r}; use e.g. W4A4KV4")
    return tuple(int(x) for x in m.groups())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", default="W4A4KV4,W4A8KV8,W4A16KV16")
    p.add_argument("--rotations", default="none,hadamard")
    p.add_argument("--weights", default="rtn")
    p.add_argument("--fp", action="store_true", help="add the FP row")
    p.add_argument("--rotation-file", help="for --rotations learned: reuse these rotations")
    p.add_argument("--eval-data", default="wikitext2")
    p.add_argument("--calib-data", default="wikitext2-valid")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--gptq-samples", type=int, default=128)
    p.add_argument("--gptq-seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    base_cfg = RunConfig(model=a.model)
    base_cfg.eval.data, base_cfg.eval.seq_len, base_cfg.eval.max_windows = a.eval_data, a.seq_len, a.max_windows
    base_cfg.train.calib_data = base_cfg.gptq.calib_data = a.calib_data
    base_cfg.gptq.samples, base_cfg.gptq.seq_len = a.gptq_samples, a.gptq_seq_len
    base_cfg.rotation.rotation_file = a.rotation_file

    model, tok = load_model(a.model)
    windows = eval_windows(base_cfg, model, tok)
    print(f"# {a.model}, {a.eval_data} {len(windows)}×{a.seq_len} tokens, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    if a.fp:
        t = time.perf_counter()
        rows.append(("FP", "-", "-", perplexity(model, windows, progress=False), 0.0))
        print(rows[-1], flush=True)
    for label in a.bits.split(","):
        w, act, kv = parse_bits(label)
        for rotation in a.rotations.split(","):
            for weights in a.weights.split(","):
                cfg = method_config(base_cfg, "rtn" if rotation == "none" else rotation)
                cfg.quant = QuantConfig(weight=QuantSpec(w, symmetric=True, clip_search=True),
                                        act=QuantSpec(act, symmetric=False, clip_ratio=0.9),
                                        key=QuantSpec(kv, symmetric=False, clip_ratio=0.95),
                                        value=QuantSpec(kv, symmetric=False, clip_ratio=0.95),
                                        weight_method=weights)
                m = copy.deepcopy(model)
                t = time.perf_counter()
                quantize_model(m, cfg, tok, progress=False)
                seconds = time.perf_counter() - t
                rows.append((label, rotation, weights, perplexity(m, windows, progress=False), seconds))
                print(rows[-1], flush=True)
                del m
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB\n")
    print("| bits | rotation | weights | perplexity | quantize s |")
    print("|---|---|---|---|---|")
    for label, rotation, weights, ppl, seconds in rows:
        print(f"| {label} | {rotation} | {weights} | {ppl:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
