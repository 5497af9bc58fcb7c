"""Wall time and peak memory of each accuracy recipe on this CPU, and what they project to at Llama-3-8B's shape.

    python benchmarks/recipe_cost.py accuracy_gptq_groups_aware05 accuracy_gptq_groups_w4a4_aware05 \
        --json benchmarks/results/recipe_cost.json

Measured: each named record (benchmarks/results/NAME.json, written by bench_accuracy.py with one row per
process, so the process's peak RSS is the recipe's) gives its quantization wall time, the part spent in GPTQ,
the part spent rotating (training, for learned rotations), the part spent tuning scales, the threads and the peak resident memory.

Projected, by bench_train.py's method (model FLOPs at the rate this run achieved): the recipe's FLOPs are
counted from the shapes for both models and the measured seconds scaled by their ratio. GPTQ per decoder layer:
the calibration forwards (2·N·T per pass: one per true-sequential group plus the output pass, twice with
--gptq-float-targets), the Hessian sums (2·T·in² per distinct input, three sums with --gptq-act-aware), the
inverse-Hessian factorisations (in³ per linear, twice with the input-aware fit) and the column updates
(2·out·in² per linear). Training and scale tuning: 8·N per token and step (forward, backward, teacher
forward). A big model
runs its matmuls at a higher rate than SmolLM2's small ones, so the projected times are upper bounds for the
same machine. Memory at 8B: float32 weights, the calibration streams and one layer's float64 Hessians.
Scale tuning's memory (no activation checkpointing): the float weights (the teacher), the stored and the
in-graph dequantized student weights (float32 each), the int8 codes, the activations one 2 × 512 batch saves
for the backward pass (12·hidden + 4·kv + 5·intermediate + heads·seq floats per token and layer) and four
float32 copies of the logits; the same formula at SmolLM2's shape sits beside the measured peak to check it.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from record import write_record  # at the top: the record's load is the one at start
from report import cost_table, load, load_reading


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    kv: int  # key/value width: kv heads × head dim
    intermediate: int
    vocab: int
    heads: int

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's q, k, v, o, gate, up, down."""
        h, kv, m = self.hidden, self.kv, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]

    def hessian_inputs(self) -> list[int]:
        """Distinct linear inputs of a layer (q/k/v and gate/up share theirs)."""
        return [self.hidden, self.hidden, self.hidden, self.intermediate]

    @property
    def layer_params(self) -> int:
        return sum(i * o for i, o in self.linears())

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden


SMOLLM2 = Shape("SmolLM2-135M", 30, 576, 192, 1536, 49152, 9)
LLAMA3_8B = Shape("Llama-3-8B", 32, 4096, 1024, 14336, 128256, 32)


def gptq_flops(s: Shape, tokens: int, act_aware: bool, float_targets: bool) -> float:
    passes = 5 * (2 if float_targets else 1)
    per_layer = (passes * 2 * s.layer_params * tokens
                 + sum(2 * tokens * i * i for i in s.hessian_inputs()) * (3 if act_aware else 1)
                 + sum(i**3 for i, _ in s.linears()) * (2 if act_aware else 1)
                 + sum(2 * o * i * i for i, o in s.linears()))
    return s.layers * per_layer


def train_flops(s: Shape, tokens_per_step: int, steps: int) -> float:
    return 8 * (s.layers * s.layer_params + s.vocab * s.hidden) * tokens_per_step * steps


def tune_memory_gb(s: Shape, batch: int = 2, seq: int = 512) -> float:
    tokens = batch * seq
    weights = (4 + 4 + 4 + 1) * s.params
    per_token_layer = 12 * s.hidden + 4 * s.kv + 5 * s.intermediate + s.heads * seq
    activations = 4 * per_token_layer * tokens * s.layers
    logits = 4 * 4 * tokens * s.vocab
    return (weights + activations + logits) / 2**30


def gptq_memory_gb(s: Shape, tokens: int, act_aware: bool, float_targets: bool) -> float:
    weights = 4 * s.params
    streams = (4 if float_targets else 2) * 4 * tokens * s.hidden  # inputs and outputs, per stream
    hessians = (3 if act_aware else 1) * 8 * s.intermediate**2
    return (weights + streams + hessians) / 2**30


def flag(flags: str, name: str, default: float) -> float:
    m = re.search(rf"{name}(?: ([0-9.]+))?", flags)
    return default if m is None else float(m.group(1) or 1.0)


def cost_row(name: str) -> dict:
    rec = load(name)
    quantized = [r for r in rec["rows"] if r.get("flags")]
    if len(quantized) != 1:
        raise SystemExit(f"{name}: expected one quantized row per record (peak RSS is per process)")
    r = quantized[0]
    flags = r["flags"]
    samples = int(flag(flags, "--gptq-samples", 128))
    tokens = samples * int(flag(flags, "--gptq-seq-len", 2048))
    aware = flag(flags, "--gptq-act-aware", 0.0) > 0
    targets = "--gptq-float-targets" in flags
    gptq_s = r.get("weights_s", 0.0)
    rotate_s = r.get("stages_s", {}).get("rotate", r["quantize_s"] - gptq_s)
    row = {"record": name, "label": r["label"], "flags": flags, "threads": rec.get("threads"),
           "quantize_s": r["quantize_s"], "gptq_s": gptq_s, "rotate_s": round(rotate_s, 1),
           "peak_rss_gb": rec.get("peak_rss_gb"), "cpu": rec["machine"].get("cpu"),
           **dict(zip(("load", "load_when"), load_reading(rec["machine"]), strict=True))}
    if r.get("weights") == "gptq":
        ratio = gptq_flops(LLAMA3_8B, tokens, aware, targets) / gptq_flops(SMOLLM2, tokens, aware, targets)
        row["gptq_8b_h"] = round(gptq_s * ratio / 3600, 1)
        row["gptq_8b_gb"] = round(gptq_memory_gb(LLAMA3_8B, tokens, aware, targets), 1)
    if r.get("rotation") == "learned" and "--rotation-file" not in flags:
        cpu_preset = 2 * 512, 60  # tokens per step, steps
        ratio = train_flops(LLAMA3_8B, *cpu_preset) / train_flops(SMOLLM2, *cpu_preset)
        row["train_8b_h"] = round(rotate_s * ratio / 3600, 1)
    tune_s = r.get("stages_s", {}).get("tune")
    if tune_s:  # --tune-scales: forward, backward and teacher forward per step, as training
        steps = (2 * 512, int(flag(flags, "--tune-scales", 0)))
        row["tune_s"] = tune_s
        row["tune_8b_h"] = round(tune_s * train_flops(LLAMA3_8B, *steps) / train_flops(SMOLLM2, *steps) / 3600, 1)
        row["tune_gb_formula"] = round(tune_memory_gb(SMOLLM2), 1)
        row["tune_8b_gb"] = round(tune_memory_gb(LLAMA3_8B), 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", help="bench_accuracy records in benchmarks/results (names, no .json)")
    p.add_argument("--json", type=Path, help="write the record here")
    a = p.parse_args()
    rows = [cost_row(name) for name in a.records]
    print(cost_table(rows))
    if a.json:
        write_record(a.json, rows=rows, shapes=[vars(SMOLLM2), vars(LLAMA3_8B)])


if __name__ == "__main__":
    main()
