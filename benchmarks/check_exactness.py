"""Perplexity of a quantized SmolLM2 two ways: the fake-quant model in memory, and its packed runtime model
saved and loaded back (the builder `freeze` uses too, so what `quantize` prints). They must agree to the
last printed digit.

    python benchmarks/check_exactness.py --config w4a4kv4-hadamard,w4a4kv4-learned,w4a8kv8-hadamard \
        --rotation-file runs/rot_w4a4.safetensors [--max-windows 16] [--json benchmarks/results/exactness.json]

Prints a Markdown table and writes a JSON record (command, commit, machine, threads, figures).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

from record import write_record  # at the top: the record's load is the one at start

CONFIGS = {  # name → (weight, activation, KV bits, rotation)
    "w4a4kv4-hadamard": (4, 4, 4, "hadamard"),
    "w4a4kv4-learned": (4, 4, 4, "learned"),
    "w4a8kv8-hadamard": (4, 8, 8, "hadamard"),
    "w4a8kv8-learned": (4, 8, 8, "learned"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="w4a4kv4-hadamard", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--rotation-file", help="R1/R2 for the learned configs (from --save-rotation)")
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    import torch

    from spinquant.api import eval_windows
    from spinquant.config import QuantSpec, RunConfig
    from spinquant.evaluation.scoring import perplexity
    from spinquant.loading import load_model
    from spinquant.pipeline import quantize_model
    from spinquant.runtime import load_quantized, save_quantized

    base, tokenizer = load_model()
    rows = []
    for name in a.config.split(","):
        w, act, kv, rotation = CONFIGS[name]
        cfg = RunConfig()
        cfg.eval.max_windows = a.max_windows
        cfg.quant.weight = QuantSpec(w, symmetric=True, clip_search=True)
        cfg.quant.act = QuantSpec(act, symmetric=False, clip_ratio=0.9)
        cfg.quant.key = cfg.quant.value = QuantSpec(kv, symmetric=False, clip_ratio=0.95)
        cfg.rotation.mode = rotation
        if rotation == "learned":
            if not a.rotation_file:
                p.error(f"{name} needs --rotation-file")
            cfg.rotation.rotation_file = a.rotation_file
        windows = eval_windows(cfg, base, tokenizer)
        model = copy.deepcopy(base)
        quantize_model(model, cfg, tokenizer, progress=False)
        row = {"config": name}
        t = time.perf_counter()
        with torch.inference_mode():
            row["fake_quant"] = perplexity(model, windows, progress=False)
        row["fake_quant_s"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            save_quantized(model, tokenizer, cfg, Path(d) / "m")
            loaded, _ = load_quantized(Path(d) / "m")
            t = time.perf_counter()
            with torch.inference_mode():
                row["saved"] = perplexity(loaded, windows, progress=False)
            row["saved_s"] = time.perf_counter() - t
        row["equal"] = row["fake_quant"] == row["saved"]
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr)
        del model
    print(f"\nSmolLM2-135M, WikiText-2 test, {a.max_windows} × 2048, {torch.get_num_threads()} threads\n")
    print("| config | fake-quant (in memory) | packed, saved and loaded | equal | seconds (fake / packed) |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['fake_quant']!r} | {r['saved']!r} | {r['equal']} | "
              f"{r['fake_quant_s']:.0f} / {r['saved_s']:.0f} |")
    if a.json:
        write_record(a.json, threads=torch.get_num_threads(), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
